"""Backend discovery and selection for every ps_kernels op.

Backends, in the order `auto` tries them:
  - CUDA tensors: ``cuda`` (native library built from csrc/cuda) -> ``triton`` -> ``reference``
  - CPU tensors:  ``cpu`` (native library built from csrc/cpu)   -> ``reference``

``triton`` also runs on CPU tensors when ``TRITON_INTERPRET=1`` is set, but only when asked
for by name (it is a test vehicle there, not a fast path).

The ``cpu`` backend's kernels are compiled once per capability level (``CPU_CAPABILITIES``,
lowest first); the native library picks the best level the CPU runs at first use, or the one
``PS_KERNELS_CPU_CAPABILITY`` names (an error when the CPU lacks it). ``cpu_capability()``
reports the levels.

A backend chosen automatically falls back quietly; a backend asked for by name (the
``backend=`` argument or ``PS_KERNELS_BACKEND``) that cannot run raises ``BackendUnavailable``
with the reason.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
#: ops with a Triton kernel (ps_kernels/triton_kernels/<op>.py); skinny_linear has none (on CUDA
#: cuBLAS, the reference's F.linear, is the peer to beat)
TRITON_OPS = ("kv_rollback", "tree_attention", "draft_attention", "tree_accept")
NATIVE_NAMESPACE = "ps_kernels_C"


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run this call."""


#: the native CPU kernels' capability levels, lowest first (csrc/cpu/dispatch.h)
CPU_CAPABILITIES = ("default", "avx2", "avx512", "avx512_bf16")


class CpuCapability(NamedTuple):
    """The native CPU kernels' instruction-set levels: ``active`` (the level in use; None
    without the native library), ``compiled`` (built into the library) and ``supported`` (this
    CPU runs them)."""
    active: str | None
    compiled: tuple[str, ...]
    supported: tuple[str, ...]


_active_level: str | None = None  # cached answer of cpu_level(); reset by force_cpu_capability
_forced_level: str | None = None  # the level force_cpu_capability set, None: automatic


def cpu_capability() -> CpuCapability:
    """The native CPU kernels' capability levels (see ``CpuCapability``).

    The active level is the best one both compiled and supported, unless
    ``PS_KERNELS_CPU_CAPABILITY`` (read at first use) names another: an unknown name or a level
    the CPU lacks raises RuntimeError naming the variable, what the CPU supports and what was
    asked. Example::

        >>> ps_kernels.cpu_capability()
        CpuCapability(active='avx2', compiled=('default', 'avx2', 'avx512', 'avx512_bf16'), supported=('default', 'avx2'))
    """
    if not native_library()[0]:
        return CpuCapability(None, (), ())
    compiled, supported = torch.ops.ps_kernels_C._cpu_capability_levels()
    return CpuCapability(cpu_level(), tuple(compiled), tuple(supported))


def runnable_cpu_levels() -> tuple[str, ...]:
    """The capability levels both compiled and supported here, lowest first (what tests and
    benchmarks may force); () without the native library. Does not choose the active level."""
    if not native_library()[0]:
        return ()
    compiled, supported = torch.ops.ps_kernels_C._cpu_capability_levels()
    return tuple(level for level in compiled if level in supported)


@torch.compiler.assume_constant_result  # torch.compile: a constant of the graph, as select() is
def cpu_level() -> str | None:
    """The active capability level's name (cached; the per-call routing reads it), None without
    the native library. Raises RuntimeError when PS_KERNELS_CPU_CAPABILITY cannot be honoured."""
    global _active_level
    if _active_level is None and native_library()[0]:
        _active_level = str(torch.ops.ps_kernels_C._cpu_capability())
    return _active_level


@contextlib.contextmanager
def force_cpu_capability(level: str):
    """Run the native CPU kernels at `level` inside the block (tests and benchmarks compare
    levels in one process); errors as for PS_KERNELS_CPU_CAPABILITY. Restores the previous
    choice afterwards."""
    global _active_level, _forced_level
    if not native_library()[0]:
        raise BackendUnavailable(f"cpu capability: {native_library()[1]}")
    previous = _forced_level
    torch.ops.ps_kernels_C._set_cpu_capability(level)
    _forced_level, _active_level = level, None
    try:
        yield
    finally:
        torch.ops.ps_kernels_C._set_cpu_capability(previous or "")
        _forced_level, _active_level = previous, None


_loaded: list[Path] = []  # the native library native_library() loaded
#: written by setup.py beside the library's place when the install did not build it (why, and how to)
BUILD_NOTE = "_native_build.json"
_warned_missing = False


class NativeLibraryWarning(UserWarning):
    """The native kernels are missing: every op runs on its PyTorch reference (Triton on a GPU)."""


def _native_missing(here: Path, reason: str) -> tuple[bool, str]:
    """(False, reason) for native_library(), the reason completed with the install's build note;
    warns once a process (NativeLibraryWarning) with the command that builds the kernels, unless
    the install skipped them on purpose (PS_KERNELS_SKIP_NATIVE=1)."""
    global _warned_missing
    try:
        note = json.loads((here / BUILD_NOTE).read_text())
    except (OSError, ValueError):
        note = {}
    if note.get("reason"):
        reason += f"; at install: {note['reason']}"
    if note.get("status") != "skipped" and not _warned_missing:
        _warned_missing = True
        rebuild = note.get("rebuild") or ("pip install cmake ninja && pip install --no-build-isolation --no-deps "
                                          "--force-reinstall <the ps_kernels source directory>")
        warnings.warn(f"ps_kernels: the native CPU/CUDA kernels are missing ({reason}). Every op runs on its "
                      f"PyTorch reference (Triton on a GPU): on a CPU the decoding loop runs at about half its speed. "
                      f"To build them: {rebuild}",
                      NativeLibraryWarning, stacklevel=3)
    return False, reason


def native_build_id() -> str:
    """A short id of the loaded native library's build (its size and modification time): a
    measurement cached against it (e.g. the decoding loop's verify-cost curve) is stale once the
    kernels are rebuilt. "none" without a native library."""
    if not native_library()[0] or not _loaded:
        return "none"
    st = _loaded[0].stat()
    try:
        level = cpu_level()  # the same library runs other code at another capability level
    except RuntimeError:
        level = "error"
    return hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}-{level}".encode()).hexdigest()[:10]


@lru_cache(maxsize=None)
def native_library() -> tuple[bool, str]:
    """Load the native library (ps_kernels/_C*.so) once. Returns (loaded, reason)."""
    here = Path(__file__).resolve().parent
    candidates = sorted(here.glob("_C*.so")) + sorted(here.glob("_C*.pyd"))
    extra = os.environ.get("PS_KERNELS_LIBRARY")
    if extra:
        candidates.insert(0, Path(extra))
    if not candidates:
        return _native_missing(here, f"native library not built: no _C*.so in {here} "
                                     "(install with `pip install --no-build-isolation .`)")
    errors = []
    for path in candidates:
        try:
            torch.ops.load_library(str(path))
            _loaded.append(path)
            _register_fakes()
            return True, f"loaded {path.name}"
        except OSError as exc:  # wrong torch ABI, missing symbols, ...
            errors.append(f"{path.name}: {exc}")
    return _native_missing(here, "native library failed to load: " + "; ".join(errors))


def _fake_skinny_linear(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _fake_in_place(*args):
    return None


#: the native ops torch.compile traces directly (the op layer calls them without its Python
#: custom-op wrappers while compiling, see ops/tree_attention.py), with their outputs' shapes for
#: tracing; the attention ops write into the out / lse / cache tensors they are given (their
#: schemas mark them mutated)
_FAKES = {"skinny_linear": _fake_skinny_linear, "tree_attention": _fake_in_place, "draft_attention": _fake_in_place,
          "tree_attention_planned": _fake_in_place, "draft_attention_planned": _fake_in_place}


def _register_fakes() -> None:
    for op, fake in _FAKES.items():
        if torch._C._dispatch_has_kernel(f"{NATIVE_NAMESPACE}::{op}"):
            torch.library.register_fake(f"{NATIVE_NAMESPACE}::{op}", fake)


def native_has(op: str, dispatch_key: str) -> bool:
    """True when the native library registered `ps_kernels_C::op` for dispatch_key (CPU/CUDA)."""
    loaded, _ = native_library()
    if not loaded:
        return False
    name = f"{NATIVE_NAMESPACE}::{op}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    except RuntimeError:
        return False


@lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable: {exc}"
    return True, f"triton {triton.__version__}"


def _env_reader(name: str):
    """A reader of one environment variable for the per-call path: ``os.environ.get`` encodes
    the key and walks a mapping wrapper on every call (~1.5 us; every op call reads two), so
    read CPython's underlying dict with the key encoded once. Still live: tests and users may
    change the variable at any time."""
    data = getattr(os.environ, "_data", None)
    encode, decode = getattr(os.environ, "encodekey", None), getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:  # not CPython's os.environ
        return lambda: os.environ.get(name)
    key = encode(name)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)
    return read


_triton_interpret = _env_reader("TRITON_INTERPRET")
_requested_backend = _env_reader("PS_KERNELS_BACKEND")


def interpreting() -> bool:
    return _triton_interpret() == "1"


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None if `backend` can run `op` on `device`, else the reason it cannot."""
    return _why_unavailable(op, backend, device.type, interpreting())


@lru_cache(maxsize=None)  # availability is fixed for a process; this runs on every op call
def _why_unavailable(op: str, backend: str, device_type: str, interp: bool) -> str | None:
    device = torch.device(device_type)
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        if not native_has(op, "CPU"):
            return f"native CPU kernel for {op} unavailable ({native_library()[1]})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        if not native_has(op, "CUDA"):
            return (f"native CUDA kernel for {op} unavailable: the library was built without "
                    f"CUDA or failed to load ({native_library()[1]})")
        return None
    if backend == "triton":
        if op not in TRITON_OPS:
            return f"no Triton kernel for {op} (ps_kernels/triton_kernels has {', '.join(TRITON_OPS)})"
        ok, reason = triton_status()
        if not ok:
            return reason
        if device.type == "cpu" and not interp:
            return "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' needs CUDA tensors, got {device}"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


# torch.compile: the choice is a constant of the traced graph (fixed per process, as the cache below
# assumes), not Python for dynamo to trace (it would reach the library loader's filesystem calls)
@torch.compiler.assume_constant_result
def select(op: str, device: torch.device, backend: str | None, auto_order: tuple[str, ...] | None = None) -> str:
    """Pick the backend for one call of `op` on tensors living on `device`. `auto_order`
    lets an op reorder the automatic choice for a shape where measurements favour another
    backend; a named backend is never overridden."""
    requested = backend if backend is not None else _requested_backend() or None
    if backend is None and requested == "triton" and op not in TRITON_OPS:
        # PS_KERNELS_BACKEND=triton forces every op that has a Triton kernel (the whole decoding
        # loop on Triton); the others keep their automatic choice. backend="triton" still fails loudly.
        requested = None
    if requested is not None and not isinstance(requested, str):
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {requested!r}")
    return _select(op, device.type, requested, auto_order, interpreting())


@lru_cache(maxsize=None)  # the answer is fixed for a process per (op, device type, request, env)
def _select(op: str, device_type: str, requested: str | None, auto_order: tuple[str, ...] | None,
            interp: bool) -> str:
    device = torch.device(device_type)
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {requested!r}")
        reason = why_unavailable(op, requested, device)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {requested!r} is unavailable: {reason}")
        return requested
    order = auto_order or (("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference"))
    for name in order:
        if why_unavailable(op, name, device) is None:
            return name
    return "reference"


def backends() -> dict[str, str]:
    """What this install can run, each backend with a one-line status."""
    loaded, why = native_library()
    cuda_built = loaded and any(
        native_has(op, "CUDA") for op in ("kv_rollback", "tree_attention", "draft_attention", "tree_accept"))
    t_ok, t_why = triton_status()
    if loaded:
        try:
            cap = cpu_capability()
            why += (f"; CPU capability {cap.active} (compiled: {', '.join(cap.compiled)}; "
                    f"this CPU supports: {', '.join(cap.supported)})")
        except RuntimeError as exc:  # PS_KERNELS_CPU_CAPABILITY names a level the CPU cannot run
            why += f"; CPU capability error: {exc}".split("\n")[0]
    return {
        "reference": "available (PyTorch)",
        "cpu": ("available (" + why + ")") if loaded else "unavailable: " + why,
        "cuda": ("available" + ("" if torch.cuda.is_available() else " (built, but no GPU visible)"))
        if cuda_built else "unavailable: native library built without CUDA kernels",
        "triton": (("available (" + t_why + ")") if torch.cuda.is_available()
                   else ("interpreter only (" + t_why + "; TRITON_INTERPRET=1, no GPU)"))
        if t_ok else "unavailable: " + t_why,
    }
