"""A model's weights in 2 MiB pages on the CPU (Linux transparent huge pages).

A decoding step streams every weight from memory once. In the 4 KiB pages torch's allocator
gets, that is a page walk every 4 KiB and a hardware prefetch stream cut at every page boundary;
in 2 MiB pages, one walk per 512 times as much. Measured on a 2-core AMD EPYC (Zen 5), the two
placements paired in one process: a Llama-3.2-1B-shaped bf16 model's plain loop 1.16x (eager) and
1.22x (compiled step) the tokens per second at one thread; SmolLM2-135M 1.05-1.21x at two threads
(benchmarks/results/hugepages/README.md).

``move(model)`` moves the model's CPU parameters into one anonymous mapping advised
``MADV_HUGEPAGE``, aligned to 2 MiB, in the model's parameter order (the order a step reads them).
The Parameter objects stay; each one's ``.data`` becomes a view of the mapping with the same
values, dtype, shape and strides, and its old storage is freed as the next one is copied (memory
stays about one model). A model whose parameters changed since (``model.to(dtype)``, a weight
replaced) has those moved again. Left as they are: parameters that share a storage with another
tensor, are not contiguous, or are tensor subclasses (quantized weights).

A move costs seconds (the kernel finds and clears a 2 MiB page per 2 MiB: 0.3-0.4 GB/s measured
on the EPYC's virtual machine) and saves a share of every later step, so ``generate`` (through
``serving``, around each call) moves a model once the time this process has spent generating with
it, times ``SAVING``, covers the move's estimated cost (its bytes at ``DEFAULT_MOVE_RATE``, or at
the rate of this process's last move): the ski-rental rule of the compiled step's default
(parallelspec/compiled.py), so a one-off call never pays for a move and a serving process moves
within its first minutes. A process that knows it will serve many calls calls ``move(model)``
after loading (the benchmarks do). The move happens only at the start of a call with no other
call of this process running on the model: no step of ours reads a storage while it is replaced.

Caveat: a thread running the model outside ``generate`` (its own forward, or transformers'
generate) at the moment of a move may read a storage being freed; call ``move(model)`` before
starting such threads, or turn the moves off with ``PARALLELSPEC_HUGE_PAGES=0``. Nothing is
moved off Linux, where the kernel's huge pages are off (``never``), or for a model on a GPU.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
#: each tensor's offset in the mapping is a multiple of this (a cache line; the kernels' vector loads)
ALIGN = 64
ENV = "PARALLELSPEC_HUGE_PAGES"
#: a model with fewer bytes to move stays as it is (its weights fit a few huge pages' worth of TLB
#: reach and the last level cache anyway; the mapping would round it up to whole 2 MiB pages)
MIN_BYTES = 8 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")

#: the share of a step the move is taken to save, for serving's rule (measured 5-22%: module docstring)
SAVING = 0.1
#: bytes a second a move is taken to copy until one in this process was timed (0.29-0.38 GB/s
#: measured on the EPYC's virtual machine, most of it the kernel providing fresh 2 MiB pages)
DEFAULT_MOVE_RATE = 0.3e9

_lock = threading.Lock()
_active: dict[int, int] = {}   # id(model) -> generate calls running on it
_rate = [DEFAULT_MOVE_RATE]    # the rate serving's rule assumes: the last move's, once there was one
# model -> seconds of generate calls on it in this process since its last move
_spent: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()
# model -> {id(param): the data pointer the move gave it}: a parameter still there needs no move
_moved: "weakref.WeakKeyDictionary[nn.Module, dict[int, int]]" = weakref.WeakKeyDictionary()


def available() -> tuple[bool, str]:
    """Whether moves happen in this process, and why not."""
    if os.environ.get(ENV, "1") == "0":
        return False, f"{ENV}=0"
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False, f"transparent huge pages are a Linux feature (platform {sys.platform})"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False, f"{THP_SETTING} is not readable (a kernel without transparent huge pages)"
    if "[never]" in setting:
        return False, f"the kernel's transparent huge pages are off ({THP_SETTING}: {setting.strip()})"
    return True, ""


def _movable(p: torch.Tensor) -> bool:
    t = p.data
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() > 0 and t.is_contiguous()
            and t.untyped_storage().data_ptr() == t.data_ptr()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _to_move(model: nn.Module) -> list[nn.Parameter]:
    """The movable parameters not where the last move put them (model.parameters() yields a tied
    parameter once)."""
    done = _moved.get(model, {})
    return [p for p in model.parameters() if done.get(id(p)) != p.data_ptr() and _movable(p)]


def _padded(p: torch.Tensor) -> int:
    return -(-p.numel() * p.element_size() // ALIGN) * ALIGN


def move(model: nn.Module) -> int:
    """Move the model's movable CPU parameters not yet in huge pages into one new mapping (module
    docstring); returns the bytes moved (0: nothing to move, less than MIN_BYTES, or moves are
    unavailable). Not safe while anything runs the model: ``serving`` calls it when no generate
    call does."""
    if not available()[0]:
        return 0
    params = _to_move(model)
    total = sum(_padded(p) for p in params)
    if total == 0 or total < MIN_BYTES:
        return 0
    started = time.perf_counter()
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)    # before any page is touched: the copies fault in 2 MiB pages
    raw = torch.frombuffer(region, dtype=torch.uint8)     # the views keep the mapping alive
    offset = -raw.data_ptr() % HUGE_PAGE
    done = _moved.setdefault(model, {})
    with torch.no_grad():
        for p in params:
            n = p.numel() * p.element_size()
            view = raw[offset:offset + n].view(p.dtype).view(p.shape)
            view.copy_(p.data)
            p.data = view
            done[id(p)] = p.data_ptr()
            offset += _padded(p)
    took = time.perf_counter() - started
    _rate[0] = total / max(took, 1e-6)
    if took > 1.0:
        print(f"parallelspec: moved the model's {total / 1e9:.1f} GB of weights into 2 MiB pages in {took:.1f} s "
              f"({ENV}=0 turns it off)", file=sys.stderr, flush=True)
    return total


def huge_bytes(t: torch.Tensor) -> int | None:
    """Bytes of the mapping holding t that the kernel backs with huge pages (/proc/self/smaps'
    AnonHugePages), or None where that is not reported."""
    address = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in filter(None, lines):
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return None


def _pays(model: nn.Module) -> bool:
    """serving's rule: the time spent generating with the model since its last move, times SAVING,
    covers the bytes left to move at the assumed rate. The parameters are scanned only once the
    calls have paid for moving MIN_BYTES (a scan of SmolLM2's 272 parameters costs 1-3 ms)."""
    paid = _spent.get(model, 0.0) * SAVING * _rate[0]     # the bytes the calls so far have paid to move
    if paid < max(MIN_BYTES, 1) or not available()[0]:
        return False
    pending = sum(_padded(p) for p in _to_move(model))
    return max(MIN_BYTES, 1) <= pending <= paid


@contextlib.contextmanager
def serving(model: nn.Module):
    """One generate call on the model: its weights are moved into huge pages first when that has
    paid (module docstring) and no other call of this process is running on it."""
    key = id(model)
    with _lock:
        if _active.get(key, 0) == 0 and _pays(model):
            move(model)
            _spent[model] = 0.0
        _active[key] = _active.get(key, 0) + 1
    started = time.perf_counter()
    try:
        yield
    finally:
        with _lock:
            _spent[model] = _spent.get(model, 0.0) + time.perf_counter() - started
            left = _active.pop(key) - 1
            if left:
                _active[key] = left
