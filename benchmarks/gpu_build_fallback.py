"""Fallback build of the native library with torch.utils.cpp_extension (used by gpu_check.sh
when torch's CMake package cannot configure CUDA on a machine). Same sources as CMakeLists.txt;
the result goes to ps_kernels/_C.so, where ps_kernels looks for it."""
import glob
import os
import shutil
import sys
from pathlib import Path

from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parents[1]
archs = os.environ.get("PS_KERNELS_CUDA_ARCHS", "9.0").replace(";", " ").split()
gencode = [f"-gencode=arch=compute_{a.replace('.', '').replace('+PTX', '')},code=sm_{a.replace('.', '').replace('+PTX', '')}"
           for a in archs]
sources = sorted(glob.glob(str(ROOT / "csrc/cpu/*.cpp"))) + sorted(glob.glob(str(ROOT / "csrc/cuda/*.cu"))) + \
    sorted(glob.glob(str(ROOT / "csrc/cuda/*_binding.cpp")))
build = ROOT / "build" / "jit"
build.mkdir(parents=True, exist_ok=True)
load(name="ps_kernels_C_jit", sources=sources, is_python_module=False, verbose=True, build_directory=str(build),
     extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "csrc/cpu"), str(ROOT / "csrc/cuda")],
     extra_cflags=["-O3", "-march=native", "-fopenmp", "-DPS_KERNELS_WITH_CUDA=1"],
     extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", "-std=c++17", *gencode])
so = build / "ps_kernels_C_jit.so"
shutil.copy(so, ROOT / "ps_kernels" / "_C.so")
print(f"built {so} -> ps_kernels/_C.so", file=sys.stderr)
