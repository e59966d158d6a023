"""Portability of the native CPU build: the per-level kernel file (csrc/cpu/level_kernels.cpp)
compiled as CMakeLists.txt compiles it, without torch's include path (so it stays framework-free),
and its symbols checked. Every symbol it gives the linker must be in its level's namespace: an
inline function or template instantiation compiled with AVX-512 flags under a shared name is a
COMDAT copy the linker may keep for every caller, and an AVX2 CPU would stop on an illegal
instruction. (The kernels' results at every level are tested in-process by the op tests.)"""
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")
NM = shutil.which("nm")
# the levels above the baseline, with CMakeLists.txt's flags
LEVEL_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mavx512bf16"],
}


def _compile(level: str, out: Path):
    cmd = [CXX, "-std=c++17", "-O3", "-ffp-contract=fast", *LEVEL_FLAGS[level], f"-DPS_CPU_LEVEL=level_{level}",
           f"-I{ROOT / 'csrc' / 'cpu'}", "-c", str(ROOT / "csrc" / "cpu" / "level_kernels.cpp"), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(CXX is None or NM is None, reason="no C++ compiler or nm on PATH")
def test_level_objects_export_only_their_namespace(tmp_path):
    objects = {level: tmp_path / f"{level}.o" for level in LEVEL_FLAGS}
    with ThreadPoolExecutor(len(objects)) as pool:  # ~5 s of CPU each
        runs = dict(zip(objects, pool.map(lambda kv: _compile(*kv), objects.items())))
    checked = 0
    for level, run in runs.items():
        if run.returncode != 0:
            if "unrecognized" in run.stderr or "unknown argument" in run.stderr:
                continue  # this compiler cannot build the level: CMake skips it too
            pytest.fail(f"level {level} did not compile:\n{run.stderr[-3000:]}")
        symbols = subprocess.run([NM, "-C", "--defined-only", "-g", str(objects[level])], check=True,
                                 capture_output=True, text=True).stdout.splitlines()
        assert any(f"ps_kernels::cpu::level_{level}::kernels()" in s for s in symbols)
        stray = [s for s in symbols if f"ps_kernels::cpu::level_{level}::" not in s]
        assert not stray, f"level {level} defines symbols outside its namespace (COMDAT-merge risk): {stray[:10]}"
        checked += 1
    if not checked:
        pytest.skip("the compiler builds none of the levels above the baseline")


_CAPABILITY_SCRIPT = r"""
import json, os, sys, torch, ps_kernels
cap = ps_kernels.cpu_capability()
report = {"active": cap.active, "compiled": cap.compiled, "supported": cap.supported,
          "backends": ps_kernels.backends()["cpu"], "errors": {}}
x, w = torch.randn(2, 8), torch.randn(3, 8)
report["ok"] = bool(torch.allclose(ps_kernels.skinny_linear(x, w, backend="cpu"), x @ w.t(), atol=1e-5))
# bad values: the variable is read at first use; returning to the automatic choice reads it again
for bad in sys.argv[1:]:
    os.environ["PS_KERNELS_CPU_CAPABILITY"] = bad
    torch.ops.ps_kernels_C._set_cpu_capability("")
    ps_kernels._backend._active_level = None
    try:
        ps_kernels.skinny_linear(x, w, backend="cpu")
        report["errors"][bad] = None
    except RuntimeError as exc:
        report["errors"][bad] = str(exc).splitlines()[0]
print(json.dumps(report))
"""


def _native_levels():
    import ps_kernels
    return ps_kernels._backend.runnable_cpu_levels(), ps_kernels._backend.CPU_CAPABILITIES


def test_capability_variable_forces_a_level_and_bad_values_fail_clearly():
    """PS_KERNELS_CPU_CAPABILITY in a fresh process: the lowest level is used and reported by
    cpu_capability() and backends(); an unknown name, and a level above the CPU's (when this
    CPU lacks one), raise an error naming the variable, the CPU's levels and the ask."""
    import json
    import os
    import sys

    runnable, every = _native_levels()
    if not runnable:
        pytest.skip("native library not built")
    above = [level for level in every if level not in runnable]
    env = dict(os.environ, PS_KERNELS_CPU_CAPABILITY="default")
    run = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, "avx3", *above[-1:]], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["active"] == "default" and report["ok"]
    assert "CPU capability default" in report["backends"]
    assert set(report["compiled"]) >= set(runnable) and set(report["supported"]) >= set(runnable)
    unknown = report["errors"]["avx3"]
    assert "PS_KERNELS_CPU_CAPABILITY=avx3" in unknown and "expected one of" in unknown
    assert ", ".join(report["supported"]) in unknown
    for level in above[-1:]:  # e.g. avx512 on an AVX2-only CPU
        msg = report["errors"][level]
        assert f"PS_KERNELS_CPU_CAPABILITY={level}" in msg and "this CPU supports" in msg, msg


def test_forcing_a_level_in_process_and_restoring_it():
    import ps_kernels
    import torch

    runnable, _ = _native_levels()
    if not runnable:
        pytest.skip("native library not built")
    best = ps_kernels.cpu_capability().active
    for level in runnable:
        with ps_kernels._backend.force_cpu_capability(level):
            assert ps_kernels.cpu_capability().active == level
            assert f"CPU capability {level}" in ps_kernels.backends()["cpu"]
    assert ps_kernels.cpu_capability().active == best
    with pytest.raises(RuntimeError, match="cpu capability: expected one of"):
        with ps_kernels._backend.force_cpu_capability("sse9"):
            pass
    assert ps_kernels.cpu_capability().active == best
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    torch.testing.assert_close(ps_kernels.skinny_linear(x, w, backend="cpu"), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_built_library_uses_wide_instructions_only_in_their_levels():
    """The loaded native library's machine code: no AVX instruction (VEX/EVEX-encoded, v*) outside
    the avx2 / avx512 levels' namespaces (the bindings and the default level must run on any
    x86-64 CPU: a wheel built on an AVX-512 machine runs on an AVX2 one), and no 512-bit register
    in the avx2 level."""
    import platform
    import re

    import ps_kernels

    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs objdump on x86-64")
    if not ps_kernels._backend.native_library()[0] or not ps_kernels._backend._loaded:
        pytest.skip("native library not built")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", str(ps_kernels._backend._loaded[0])],
                          check=True, capture_output=True, text=True).stdout
    wide, zmm_in_avx2, fn = set(), set(), ""
    header, insn = re.compile(r"^[0-9a-f]+ <(.*)>:$"), re.compile(r"^\s+[0-9a-f]+:\t(\S+)\s*(.*)$")
    for line in text.splitlines():
        m = header.match(line)
        if m:
            fn = m.group(1)
            continue
        m = insn.match(line)
        if not m:
            continue
        in_level = re.search(r"ps_kernels::cpu::level_avx(2|512|512_bf16)::", fn)
        if m.group(1).startswith("v") and not in_level:
            wide.add(fn)
        if "%zmm" in m.group(2) and "ps_kernels::cpu::level_avx2::" in fn:
            zmm_in_avx2.add(fn)
    assert not wide, f"AVX instructions outside the avx2/avx512 levels: {sorted(wide)[:5]}"
    assert not zmm_in_avx2, f"512-bit registers in the avx2 level: {sorted(zmm_in_avx2)[:5]}"
