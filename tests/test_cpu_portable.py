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
