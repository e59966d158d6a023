"""Every CUDA kernel file compiles with nvcc alone (framework-free headers) for sm_80 and sm_90.
The torch bindings (*_binding.cpp) build only where a CUDA torch exists (the GPU script)."""
import os
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
           "-I", str(ROOT / "csrc" / "cuda"), str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


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
