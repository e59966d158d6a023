"""Build: setup.py drives CMakeLists.txt with Ninja (as vLLM does) to build ps_kernels/_C.so.

    pip install --no-build-isolation .        # after `pip install torch==...`
    PS_KERNELS_SKIP_CUDA=1 pip install ...    # CPU kernels only
    PS_KERNELS_SKIP_NATIVE=1 pip install ...  # no native library at all (Triton/PyTorch paths)

    PS_KERNELS_NATIVE_ARCH=1 pip install ...  # -march=native: local tuning only (runs on this CPU only)

The CPU kernels are compiled once per capability level the compiler can build (default, avx2,
avx512, avx512_bf16; see CMakeLists.txt) and chosen at run time from the CPU, so a wheel built on
an AVX-512 machine runs on an AVX2 one at that machine's best level (PS_KERNELS_CPU_CAPABILITY
forces a lower level; ps_kernels.cpu_capability() reports it).

Without a compiler toolchain the native build fails softly: the package installs and runs on
its Triton and PyTorch backends, and ps_kernels.backends() says why the native one is missing.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CompileError
except ImportError:  # older setuptools
    from distutils.errors import CompileError

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        # optional: a failed native build leaves a working pure-Python install behind
        super().__init__(name, sources=[], optional=os.environ.get("PS_KERNELS_REQUIRE_NATIVE") != "1")


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if os.environ.get("PS_KERNELS_SKIP_NATIVE") == "1":
            print("ps_kernels: PS_KERNELS_SKIP_NATIVE=1, native library not built")
            return
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = target.parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") or _ninja_module() else []
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-DPS_KERNELS_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PS_KERNELS_BUILD_TYPE', 'Release')}",
        ]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        try:
            subprocess.run(cfg, check=True)
            subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
            built = out_dir / "_C.so"
            if built != target:  # setuptools wants the ABI-tagged name
                shutil.move(str(built), str(target))
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"ps_kernels: WARNING: native build failed ({exc}); installing without it. "
                  "Set PS_KERNELS_REQUIRE_NATIVE=1 to make this an error.", file=sys.stderr)
            raise CompileError(str(exc)) from exc  # optional extension: setuptools skips it


def _ninja_module():
    try:
        import ninja  # noqa: F401
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return True
    except ImportError:
        return False


setup(
    ext_modules=[CMakeExtension("ps_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
