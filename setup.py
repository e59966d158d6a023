"""Build: setup.py drives CMakeLists.txt with Ninja (as vLLM does) to build ps_kernels/_C.so.

    pip install --no-build-isolation .        # after `pip install torch==...`
    PS_KERNELS_SKIP_CUDA=1 pip install ...    # CPU kernels only
    PS_KERNELS_SKIP_NATIVE=1 pip install ...  # no native library at all (Triton/PyTorch paths)

    PS_KERNELS_NATIVE_ARCH=1 pip install ...  # -march=native: local tuning only (runs on this CPU only)

The CPU kernels are compiled once per capability level the compiler can build (default, avx2,
avx512, avx512_bf16; see CMakeLists.txt) and chosen at run time from the CPU, so a wheel built on
an AVX-512 machine runs on an AVX2 one at that machine's best level (PS_KERNELS_CPU_CAPABILITY
forces a lower level; ps_kernels.cpu_capability() reports it).

Without a compiler toolchain (a C++17 compiler, cmake, ninja) the native build fails softly: the
package installs and runs on its Triton and PyTorch backends (on a CPU at about half the speed). It
says so loudly: a warning on the terminal at install (pip hides a build's output unless -v), and
a note (ps_kernels/_native_build.json) from which ps_kernels warns once at first use, with the
reason and the command to build the kernels. PS_KERNELS_REQUIRE_NATIVE=1 makes it an error.
"""
import json
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
#: written beside the native library's place when it was not built; ps_kernels/_backend.py reads it
BUILD_NOTE = "_native_build.json"
#: how to get the native kernels after an install without them
REBUILD = f"pip install cmake ninja && pip install --no-build-isolation --no-deps --force-reinstall {ROOT}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        # optional: a failed native build leaves a working pure-Python install behind
        super().__init__(name, sources=[], optional=os.environ.get("PS_KERNELS_REQUIRE_NATIVE") != "1")


class CMakeBuild(build_ext):
    def run(self):
        # an editable install (or build_ext --inplace) builds elsewhere and copies the library into
        # the source tree: the note must go there too (setuptools resets `inplace` during the build)
        self._in_tree = bool(self.inplace) or bool(getattr(self, "editable_mode", False))
        super().run()

    def _write_note(self, out_dir: Path, note: dict | None) -> None:
        """The build note beside the library's place (and in the source tree for an in-tree
        build); None removes a stale one."""
        for d in {out_dir, *([ROOT / "ps_kernels"] if getattr(self, "_in_tree", False) else [])}:
            d.mkdir(parents=True, exist_ok=True)
            (d / BUILD_NOTE).unlink(missing_ok=True)
            if note is not None:
                (d / BUILD_NOTE).write_text(json.dumps(note))

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = target.parent
        self._write_note(out_dir, None)
        if os.environ.get("PS_KERNELS_SKIP_NATIVE") == "1":
            print("ps_kernels: PS_KERNELS_SKIP_NATIVE=1, native library not built")
            self._write_note(out_dir, {"status": "skipped", "reason": "built with PS_KERNELS_SKIP_NATIVE=1"})
            return
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
            if isinstance(exc, FileNotFoundError):
                reason = f"{Path(exc.filename or 'cmake').name} not found on PATH"
            elif isinstance(exc, subprocess.CalledProcessError):
                reason = f"{Path(exc.cmd[0]).name} exited with status {exc.returncode} (pip install -v shows its output)"
            else:
                reason = str(exc)
            if ext.optional:
                self._write_note(out_dir, {"status": "failed", "reason": reason, "rebuild": REBUILD})
                _announce(f"ps_kernels: WARNING: the native CPU/CUDA kernels were NOT built: {reason}.\n"
                          "  The package installs without them and runs on its PyTorch/Triton backends: on a CPU\n"
                          "  the decoding loop at about half its speed. To build them (a C++17 compiler, cmake, ninja):\n"
                          f"    {REBUILD}\n"
                          "  PS_KERNELS_REQUIRE_NATIVE=1 makes this an error; PS_KERNELS_SKIP_NATIVE=1 skips the build quietly.")
            raise CompileError(reason) from exc  # optional extension: setuptools skips it


def _announce(message: str) -> None:
    """To stderr, and to the terminal as well: pip captures a build's output and shows it only
    with -v or when the build fails, and this one succeeds without the native library."""
    print(message, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:  # no terminal (CI, a container without a tty): the note and the first-use warning remain
        pass


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
