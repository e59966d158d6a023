"""Counting host syncs on a CPU-only machine.

On CUDA a host sync is any point where Python waits for the device: reading a value
(``.item()``, ``int()``/``float()``/``bool()`` of a tensor, ``.tolist()``, ``.numpy()``), copying
to the host (``.cpu()``, ``.to("cpu")``), an op whose output shape depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave``
without ``output_size``), and a blocking host-to-device copy of Python data (``torch.tensor(...,
device=...)``: torch copies pageable memory and then waits for the stream). On a CPU none of
these wait, so they are counted by instrumentation: a ``TorchDispatchMode`` sees the aten ops
(``_local_scalar_dense`` is what every scalar read becomes), and the Python entry points that
never reach the dispatcher on a CPU tensor (``tolist``, ``numpy``, ``cpu``, ``to``,
``torch.tensor``) are wrapped. Each event is kept with the line of the caller that caused it.
"""
from __future__ import annotations

import contextlib
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                   aten.equal.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def _where() -> str:
    """file:line of the first frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if "/torch/" in f or f.endswith("sync_counter.py") or "/transformers/" in f:
            continue
        return f"{f.rsplit('/', 2)[-2]}/{f.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class _Mode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DATA_DEPENDENT:
            self.counter._hit(str(func.overloadpacket.__name__))
        elif func == aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.counter._hit("repeat_interleave")
        elif func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.counter._hit("bool_index")
        return func(*args, **kwargs)


def _caller_is_library() -> bool:
    """The wrapped call was made by torch or transformers code itself (e.g. rotary embeddings'
    ``.to(x.device)``: a move to the working device, which on a CPU is "cpu" too)."""
    frame = sys._getframe(3)
    f = frame.f_code.co_filename
    return "/torch/" in f or "/transformers/" in f


def _targets_cpu(args, kwargs) -> bool:
    dev = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            dev = a
    return dev is not None and torch.device(dev).type == "cpu"


class SyncCounter:
    """with SyncCounter() as c: ...; c.events: [(what, where)]; c.mark() splits them into
    intervals (c.intervals: the events between consecutive marks)."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.marks: list[int] = []
        self._depth = 0

    def _hit(self, what: str) -> None:
        if self._depth == 0:
            self.events.append((what, _where()))

    def mark(self) -> None:
        self.marks.append(len(self.events))

    @property
    def intervals(self) -> list[list[tuple[str, str]]]:
        bounds = self.marks + [len(self.events)]
        return [self.events[a:b] for a, b in zip(bounds, bounds[1:])]

    @contextlib.contextmanager
    def _quiet(self):
        """Events inside a wrapped call are the wrapped call's own (tolist reads scalars)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def _wrap(self, owner, name, what, when=None):
        original = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            if when is None or when(args, kwargs):
                counter._hit(what)
            with counter._quiet():
                return original(*args, **kwargs)
        setattr(owner, name, wrapper)
        self._restore.append((owner, name, original))

    def __enter__(self):
        self._restore = []
        T = torch.Tensor
        self._wrap(T, "tolist", "tolist")
        self._wrap(T, "numpy", "numpy")
        self._wrap(T, "cpu", "cpu")
        self._wrap(T, "to", "to(cpu)", lambda a, k: _targets_cpu(a[1:], k) and not _caller_is_library())
        self._wrap(T, "__bool__", "bool")
        self._wrap(T, "__int__", "int")
        self._wrap(T, "__float__", "float")
        self._wrap(T, "item", "item")
        # Python data copied to a device, blocking (pageable memory)
        self._wrap(torch, "tensor", "tensor(device=)", lambda a, k: k.get("device") is not None)
        self._wrap(torch, "as_tensor", "as_tensor(device=)", lambda a, k: k.get("device") is not None)
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        return False


def count_step_syncs(run, *mark_targets) -> SyncCounter:
    """Run `run()` under a SyncCounter, marking each call of the `mark_targets` ((owner, name)
    pairs: the decoding loop's per-step bookkeeping call, the call that ends the loop)."""
    counter = SyncCounter()
    originals = []
    for owner, name in mark_targets:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def marked(*args, _original=original, **kwargs):
            counter.mark()
            return _original(*args, **kwargs)
        setattr(owner, name, marked)
    try:
        with counter:
            run()
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return counter


if __name__ == "__main__":  # pragma: no cover - quick self-check
    with SyncCounter() as c:
        x = torch.arange(5)
        int(x[0]); x.tolist(); bool(x.any()); x.nonzero(); x[x > 2]; torch.tensor([1], device="cpu")
    print(c.events, file=sys.stderr)
