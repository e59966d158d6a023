"""Every CUDA kernel file compiles with nvcc alone (framework-free headers) for sm_80 and sm_90,
the attention kernels with their features (window, soft-cap, sinks: runtime branches in every
instantiation, checked in the PTX). The torch bindings (*_binding.cpp) are compiled too, host
code only (g++ -fsyntax-only against this CPU torch's headers and the CUDA runtime headers, one
translation unit): they are linked and run only where a CUDA torch exists (the GPU script)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (shutil.which("/usr/local/cuda/bin/nvcc"))


def test_there_are_cuda_kernels():
    assert KERNELS, "csrc/cuda/*.cu is empty"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", KERNELS, ids=[k.name for k in KERNELS])
def test_nvcc_compiles(source, arch, tmp_path):
    cmd = [NVCC, "-c", f"-arch={arch}", "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings",
           "--keep", "--keep-dir", str(tmp_path),
           "-I", str(ROOT / "csrc" / "cuda"), str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    if source.name in ATTENTION_KERNELS:
        check_attention_ptx(next(tmp_path.glob("*.ptx")).read_text(), *ATTENTION_KERNELS[source.name])


# attention launcher -> (mask kinds it instantiates, head dims: 64/80/96/128 and the generic 0)
ATTENTION_KERNELS = {"tree_attention.cu": ({0, 1}, {0, 64, 80, 96, 128}),
                     "draft_attention.cu": ({2}, {0, 64, 80, 96, 128})}


def check_attention_ptx(ptx: str, masks: set, head_dims: set) -> None:
    """Every (dtype, head dim, mask) instantiation of attention_fwd_kernel is in the PTX, and
    each carries the soft-cap's tanh (the features are runtime branches of every kernel, not
    template variants left uninstantiated)."""
    entries = re.split(r"\.entry\s+", ptx)[1:]
    found = {}
    for body in entries:
        m = re.match(r"_ZN\w*attention_fwd_kernelI(\w+?)Li(\d+)ELi(\d+)E", body)
        if m:
            found[(m.group(1), int(m.group(2)), int(m.group(3)))] = body
    dtypes = {k[0] for k in found}
    assert len(dtypes) == 3, f"expected float/half/bfloat16 instantiations, got {sorted(dtypes)}"
    assert {(d, h, k) for d in dtypes for h in head_dims for k in masks} == set(found), sorted(found)
    no_cap = [k for k, body in found.items() if "tanh.approx.f32" not in body]
    assert not no_cap, f"attention_fwd_kernel instantiations without the soft-cap's tanh: {no_cap}"


HEADERS = sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
def _cuda_include():
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"] + ([str(Path(NVCC).resolve().parent.parent)] if NVCC else [])
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


CUDA_INCLUDE = _cuda_include()
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CUDA_INCLUDE is None or CXX is None, reason="needs the CUDA headers (cuda_runtime.h) and a host C++ compiler")
@pytest.mark.parametrize("header", HEADERS, ids=[h.name for h in HEADERS])
def test_headers_compile_as_host_cpp(header, tmp_path):
    """The torch bindings are host C++ (g++): every header they include must compile there."""
    src = tmp_path / "inc.cpp"
    src.write_text(f'#include "{header.name}"\nint main() {{ return 0; }}\n')
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-I", str(CUDA_INCLUDE), "-I",
           str(ROOT / "csrc" / "cuda"), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


def test_split_plan_header_is_plain_cpp(tmp_path):
    """attention_plan.h (the split plan the CPU build registers) needs no CUDA header."""
    if CXX is None:
        pytest.skip("needs a host C++ compiler")
    src = tmp_path / "plan.cpp"
    src.write_text('#include "attention_plan.h"\nint main() { return int(ps_kernels::cuda::plan_attention_splits('
                   '1, 8, 2, 1, 4096, 132).num_splits); }\n')
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-I", str(ROOT / "csrc" / "cuda"), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*_binding.cpp"))


def _torch_includes():
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    paths = [Path(p) for p in include_paths()]
    return paths if any((p / "c10" / "cuda" / "CUDAGuard.h").exists() for p in paths) else None


TORCH_INCLUDES = _torch_includes()


def _runtime_headers():
    """The CUDA runtime headers: the toolkit's, or those of the PyPI wheels nvidia-cuda-runtime
    and nvidia-cuda-crt (nvidia/cu*/include) where no toolkit is installed."""
    if CUDA_INCLUDE is not None:
        return CUDA_INCLUDE
    import sys
    for root in sys.path:
        for inc in sorted(Path(root).glob("nvidia/cu*/include")):
            if (inc / "cuda_runtime.h").exists() and (inc / "crt" / "host_defines.h").exists():
                return inc
    return None


RUNTIME_HEADERS = _runtime_headers()


@pytest.mark.skipif(RUNTIME_HEADERS is None or CXX is None or TORCH_INCLUDES is None,
                    reason="needs the CUDA runtime headers, a host C++ compiler and torch's headers (c10/cuda)")
def test_torch_bindings_compile_without_cuda_torch(tmp_path):
    """The CUDA torch bindings, host C++ only, against this (CPU) torch's headers: one
    translation unit for all of them (torch's headers parsed once, ~10 s). A CPU torch lacks
    the one generated header c10/cuda/impl/cuda_cmake_macros.h: C10_CUDA_NO_CMAKE_CONFIGURE_FILE
    skips it (it only sets C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows). Bindings
    must not include ATen/cuda/CUDAContext.h (it needs the cuBLAS/cuSPARSE headers)."""
    assert BINDINGS, "csrc/cuda/*_binding.cpp is empty"
    unity = tmp_path / "bindings.cpp"
    unity.write_text("".join(f'#include "{b}"\n' for b in BINDINGS))
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    for p in TORCH_INCLUDES + [RUNTIME_HEADERS]:
        cmd += ["-isystem", str(p)]
    cmd += ["-I", str(ROOT / "csrc"), "-I", str(ROOT / "csrc" / "cuda"), str(unity)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr[-6000:]}"
