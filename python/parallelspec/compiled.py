"""The verify step's target pass compiled on the CPU (``generate(..., compile=True)``).

On a CPU about half of a small model's step is spent outside the kernels: some 3,000 dispatcher
calls a step issued from Python through the HF modules (views, dtype casts, the RMSNorm and RoPE
arithmetic, the residual adds). ``torch.compile`` (inductor) traces the target's pass over the
tree (``engine.verify``: the model's forward with our attention and few-row linears, then the LM
head) into one graph and fuses those small ops into a few C++ loops around the ps_kernels calls.
The native ops are traced as themselves (``ps_kernels._backend._FAKES``), opaque calls in the
graph with no Python wrapper around them.

What is compiled, and how often:

- only the target's pass: tree_accept, the recording and the commit stay eager (a few ops; they
  read per-call Python values such as max_new_tokens and the EOS ids, which would recompile);
- once per tree-size bucket: ``CompiledVerify`` pads each tree to ``capture.bucket`` sizes with
  ``capture.TreeBuffers`` (pad nodes are never accepted; see capture.py), so a generation compiles
  at most one graph per power of two up to its largest tree (plus the batch size and tree layout);
- the cache's rows are rounded up to a power of two (``cache_rows``), so that other prompt
  lengths and max_new_tokens reuse the graphs (the graphs are static: with the rows as a dynamic
  dimension, torch 2.13's inductor dropped the symbolic offset of the V view, ``kv[l, 1]``, and
  handed the attention op K's rows as V's); the layers' K/V are taken as views of the one cache
  tensor inside the graph, so the attention op's in-place cache writes stay in place (separate
  view inputs made inductor copy a layer's cache in and out every call);
- the compiled artifacts (inductor's FX graph cache and AOTAutograd cache) are kept under
  ``<parallelspec cache>/inductor/<torch version>-<CPU levels>-<ps_kernels build>``, unless
  ``TORCHINDUCTOR_CACHE_DIR`` names another place: a later process on the same machine re-traces
  (seconds) and loads the compiled code instead of compiling it.

Guards: dynamo checks a graph's assumptions before each call; its checks on the model's modules
(every attribute and parameter of ~200 modules) are dropped (``GUARD_FILTER``) and replaced by
``model_key``, taken once per generate call, with one compiled callable per key: a model converted
to another dtype, given another weight or config, gets graphs of its own.

A compile failure falls back to the eager pass with one ``CompileFallbackWarning`` for the
process (the failed attempt writes only scratch cache rows, so the eager rerun is exact); no
result depends on whether the pass ran compiled. The step keeps its one host sync: the compiled
graph is traced whole (``fullgraph=True``), so no host read can hide in it.

``compile=True`` compiles each shape at its first step. ``compile=None`` (the default, on the CPU)
compiles a shape once it has earned it (``Ledger``): each shape of each model runs eagerly, timed,
until the time this process has spent on it eagerly, times the share of a step compiling saves,
reaches what compiling it costs; then it is compiled, with one line saying so. That is the rule
of renting skis until the rent paid equals the price: whatever the process does next, it never
spends more than twice what the better choice in hindsight would have (a short run stays eager;
a process that serves many calls compiles its hot shapes). The cost and the saving are this
machine's own, measured at each compile and kept next to inductor's cache (``COSTS_FILE``); until
a shape was measured, ``DEFAULT_COMPILE_SECONDS`` and ``DEFAULT_SAVING``. A shape measured slower
compiled stays eager. docs/BACKENDS.md ("Compiled step on the CPU") gives the measurements.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Callable

import torch

from .capture import TreeBuffers, bucket, layout
from .trees import Tree

#: compile=None's estimates for a shape not yet measured on this machine (the module docstring):
#: seconds to compile it (15-31 s measured for SmolLM2's shapes on a 2-core EPYC, 22 s for a 1B
#: model's; 6-9 s from the warm cache) and the share of an eager step it saves (SmolLM2 steps
#: measured 1.25x-1.56x faster: 20-36%; a 1B model's 9% at one thread)
DEFAULT_COMPILE_SECONDS = 25.0
DEFAULT_SAVING = 0.2
#: the estimate for a shape compiled here before (its code in inductor's cache) whose load was
#: not yet measured: a later process re-traces and loads it (6-9 s measured), the cold compile's
#: time would overstate it
DEFAULT_LOAD_SECONDS = 8.0
#: the saving recorded in COSTS_FILE: the median of MEASURE_STEPS compiled steps, the first
#: MEASURE_SKIP after the compile left out (their first runs are slower: measured up to ~3x a
#: SmolLM2 step), against the median of the shape's last MEASURE_STEPS eager steps
MEASURE_STEPS = 16
MEASURE_SKIP = 3
#: this machine's measured costs, per shape, in inductor's cache folder
COSTS_FILE = "parallelspec_verify_costs.json"
#: inductor by default; the tests set "aot_eager" (same tracing, no C++ compile) for speed
BACKEND = "inductor"
#: graphs one process may keep for the pass (buckets x batch sizes x layouts x models); dynamo's own
#: default of 8 would send a hybrid's ninth shape back to eager
RECOMPILE_LIMIT = 64


class CompileFallbackWarning(UserWarning):
    """The compiled verify step failed; the loop runs the eager one (same results, slower)."""


#: models (model_key) whose compiled pass one process keeps; the oldest is dropped past this
MODELS_KEPT = 4


class _State:
    """Per process: the compiled pass of each model (model_key -> callable, oldest first), a failure
    that turned compiling off, the seconds the first call of each shape took (compiling it, or
    loading it from inductor's cache), and compile=None's ledger of each model (model_key)."""

    def __init__(self):
        self.compiled: dict[tuple, Callable] = {}
        self.failure: str | None = None
        self.first_call_seconds: dict[tuple, float] = {}
        self.ledgers: dict[tuple, "Ledger"] = {}


_state = _State()


#: check_options' answers: the step runs eagerly, compiled from its first step, or compiled once earned
EAGER, NOW, EARNED = None, "now", "earned"


def check_options(compile, device: torch.device, cuda_graph=False) -> str | None:
    """generate()'s ``compile`` (True, False or None, the default) against the device and the other
    options; returns EAGER, NOW (compile=True) or EARNED (None on the CPU without a CUDA graph)."""
    if compile is not None and not isinstance(compile, bool):
        raise ValueError(f"compile: expected True, False or None (the default), got {compile!r}")
    if compile is False or (compile is None and (device.type != "cpu" or cuda_graph)):
        return EAGER
    if device.type != "cpu":
        raise ValueError(f"compile: expected a model on the CPU, got {device.type} (the compiled step is the CPU's "
                         "counterpart of cuda_graph=True; pass compile=False, and cuda_graph=True on a GPU)")
    if cuda_graph:
        raise ValueError("compile: expected cuda_graph=False with compile=True (a CUDA graph captures the GPU "
                         "step; the compiled step is for the CPU)")
    return NOW if compile else EARNED


def cache_dir() -> Path:
    """Where this machine's compiled artifacts go: per torch version, CPU level and ps_kernels build."""
    import ps_kernels

    from .models import cache_dir as package_cache

    key = f"torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-" \
          f"{ps_kernels.cpu_capability().active}-{ps_kernels.native_build_id()}"
    return package_cache() / "inductor" / re.sub(r"[^A-Za-z0-9._+-]", "_", key)


def _chosen_dir() -> Path:
    """Inductor's cache folder: ``TORCHINDUCTOR_CACHE_DIR`` where the user chose one, else
    cache_dir() (importing torch's compiler fills the variable with its default, a folder under
    /tmp, which does not count as a choice)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        return cache_dir()
    return Path(chosen)


def _use_cache_dir() -> str:
    """Point inductor's caches (it reads ``TORCHINDUCTOR_CACHE_DIR`` at each use) at _chosen_dir()."""
    path = _chosen_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)


def cache_rows(rows: int) -> int:
    """The cache rows a compiled generation allocates for `rows` needed: the next power of two,
    at least 1024 (a few sizes, hence few graphs: each size compiles every bucket again; at most
    twice the memory past 1024 rows, e.g. 47 MB for SmolLM2-135M in fp32 at 1024)."""
    return max(1024, 1 << (rows - 1).bit_length())


class _LayerViews:
    """The cache as the compiled pass sees it: each layer's (K, V) a view of the one kv tensor
    taken inside the graph, and the lengths."""

    def __init__(self, cache):
        self.kv, self.lens = cache.kv, cache.lens

    def layer(self, index: int):
        return self.kv[index, 0], self.kv[index, 1]


def _target_pass(verify, target, cache, tree):
    return verify(target, _LayerViews(cache), tree)


#: inductor's options: round low-precision intermediates as eager does (inductor otherwise keeps a
#: fused chain of bf16 ops in fp32, a different model: SmolLM2 in bf16 then left the eager greedy
#: output within 128 tokens on every prompt tried; with it, the outputs were equal)
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}


def model_key(model: torch.nn.Module) -> tuple:
    """What a model's compiled graphs take as fixed and dynamo is told not to check at each call
    (``GUARD_FILTER``): the model object, every parameter's and buffer's object, dtype, shape and
    strides, the modules' training flags, and its config. Taken once per generate call; a model
    whose key changed (converted to another dtype, a weight replaced, put in training mode, a
    config edited) gets graphs of its own."""
    tensors = tuple((name, id(t), t.dtype, tuple(t.shape), t.stride())
                    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()))
    training = tuple(m.training for m in model.modules())
    return id(model), tensors, training, _config_text(model)


def _config_text(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return config.to_json_string() if hasattr(config, "to_json_string") else repr(config)


#: dynamo's guards to keep: all but those on the model's modules (their attributes and
#: parameters; ~200 modules for SmolLM2, whose checks took 1.7 ms of a 27 ms bf16 step at one
#: thread). model_key stands in for them, once per generate call, with one compiled callable per
#: key. None (torch before guard_filter_fn) keeps every guard.
GUARD_FILTER = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)


def _own_code(fn: Callable) -> Callable:
    """fn with a code object of its own: dynamo keeps compiled graphs per code object, so each
    model's graphs (and its recompile limit) stay apart from the other models'."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compile(fn: Callable) -> Callable:
    options = dict(INDUCTOR_OPTIONS) if BACKEND == "inductor" else {}
    if GUARD_FILTER is not None:
        options["guard_filter_fn"] = GUARD_FILTER
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=BACKEND, options=options or None)


def _compiled(key: tuple) -> Callable:
    fn = _state.compiled.get(key)
    if fn is None:
        while len(_state.compiled) >= MODELS_KEPT:
            del _state.compiled[next(iter(_state.compiled))]
        fn = _state.compiled[key] = _compile(_own_code(_target_pass))
    return fn


def _fallback(exc: BaseException) -> None:
    root = exc
    while True:    # torch wraps a backend's error (BackendCompilerFailed.inner_exception)
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None or inner is root:
            break
        root = inner
    lines = str(root).strip().splitlines()
    _state.failure = f"{type(root).__name__}: {lines[0] if lines else ''}"
    warnings.warn(f"compile: compiling the verify step failed ({_state.failure}); running it eagerly (same "
                  "results, slower) for the rest of this process. Pass compile=False to skip compiling.",
                  CompileFallbackWarning, stacklevel=4)


def compiled_pass(verify: Callable, target, cache, tree: Tree, model: tuple):
    """``verify(target, cache, tree)`` through the compiled graph of its shapes (compiled on first
    use, then from inductor's cache), or eagerly after a compile failure in this process.
    model: ``model_key(target.model)``, taken once per generate call (CompiledVerify)."""
    if _state.failure is None:
        key = (id(target.model), target.dtype, tuple(tree.tokens.shape), layout(tree), cache.kv.shape[4])
        first = key not in _state.first_call_seconds
        started = time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                result = _compiled(model)(verify, target, cache, tree)
        except Exception as exc:  # noqa: BLE001  (any failure: the eager pass below is the answer)
            _fallback(exc)
        else:
            if first:
                took = _state.first_call_seconds[key] = time.perf_counter() - started
                if took > 1.0:
                    print(f"parallelspec: compiled the verify step for {tree.size}-node trees (batch "
                          f"{tree.tokens.shape[0]}, {str(target.dtype).removeprefix('torch.')}) in {took:.0f} s; "
                          f"cached in {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '?')} (compile=False turns "
                          "it off)", file=sys.stderr, flush=True)
            return result
    return verify(target, cache, tree)


def _read_costs(path: Path) -> dict:
    try:
        costs = json.loads(path.read_text())
    except (OSError, ValueError):   # none yet, or a file cut short: the defaults stand in
        return {}
    return costs if isinstance(costs, dict) else {}


class _Shape:
    """One shape's account in this process: eager steps, their seconds and the last MEASURE_STEPS
    of them; compiled steps, the first one's seconds (the compile itself) and the timed ones."""

    def __init__(self):
        self.eager_steps, self.eager_seconds = 0, 0.0
        self.eager_recent: collections.deque[float] = collections.deque(maxlen=MEASURE_STEPS)
        self.compiled_steps, self.compile_seconds = 0, 0.0
        self.compiled_timed: list[float] = []


class Ledger:
    """One model's shapes in this process (``compile=None``, the module docstring): ``earned(shape)``
    says whether a shape runs compiled, ``eager``/``compiled`` book each step's seconds. A shape
    (tree bucket, tree layout, batch, cache rows) is earned once its eager seconds x the saving >=
    the compile cost, each this machine's measurement of the shape (``COSTS_FILE``) or the
    defaults; a shape measured no faster compiled is never earned. A shape compiled in this
    process (``compile=True`` compiles at once, and the ledger measures and records that too) is
    earned for the later calls."""

    def __init__(self, model: torch.nn.Module):
        params = [(name, tuple(t.shape), str(t.dtype)) for name, t in model.named_parameters()]
        self.signature = hashlib.sha1(repr((_config_text(model), params)).encode()).hexdigest()[:16]
        self.path = _chosen_dir() / COSTS_FILE
        self.costs = {k: v for k, v in _read_costs(self.path).items() if k.startswith(self.signature)}
        self.shapes: dict[tuple, _Shape] = {}
        self.earned_shapes: set[tuple] = set()

    def _name(self, shape: tuple) -> str:
        return f"{self.signature}-{'-'.join(map(str, shape))}"

    def estimate(self, shape: tuple) -> tuple[float, float, bool]:
        """(seconds to compile or load, share of an eager step saved, measured here?) for a shape:
        its load time once compiled here before (its code is in inductor's cache), else its
        compile time, else the defaults."""
        cost = self.costs.get(self._name(shape), {})
        eager, fast = cost.get("eager_ms"), cost.get("compiled_ms")
        saving = 1.0 - fast / eager if eager and fast else DEFAULT_SAVING
        if "load_seconds" in cost:
            seconds = cost["load_seconds"]
        elif "compile_seconds" in cost:
            seconds = min(cost["compile_seconds"], DEFAULT_LOAD_SECONDS)
        else:
            seconds = DEFAULT_COMPILE_SECONDS
        return seconds, saving, bool(cost)

    def earned(self, shape: tuple) -> bool:
        if shape in self.earned_shapes:
            return True
        account = self.shapes.get(shape)
        if account is None:
            return False
        seconds, saving, measured = self.estimate(shape)
        if saving <= 0 or account.eager_seconds * saving < seconds:
            return False
        self.earned_shapes.add(shape)
        print(f"parallelspec: compiling the verify step for {shape[0]}-node trees (batch {shape[2]}): this process "
              f"has run it eagerly for {account.eager_seconds:.0f} s ({account.eager_steps} steps), which compiling "
              f"cuts by ~{saving:.0%}, as much as compiling it (or loading it from the cache) takes here "
              f"(~{seconds:.0f} s, {'measured' if measured else 'estimated'}); compile=False keeps it eager, "
              "compile=True compiles at once", file=sys.stderr, flush=True)
        return True

    def eager(self, shape: tuple, seconds: float) -> None:
        account = self.shapes.setdefault(shape, _Shape())
        account.eager_steps += 1
        account.eager_seconds += seconds
        account.eager_recent.append(seconds)

    def compiled(self, shape: tuple, seconds: float) -> None:
        account = self.shapes.setdefault(shape, _Shape())
        self.earned_shapes.add(shape)
        account.compiled_steps += 1
        if account.compiled_steps == 1:
            account.compile_seconds = seconds
        elif account.compiled_steps > 1 + MEASURE_SKIP and len(account.compiled_timed) < MEASURE_STEPS:
            account.compiled_timed.append(seconds)
            if len(account.compiled_timed) == MEASURE_STEPS:
                self._record(shape, account)

    def _record(self, shape: tuple, account: _Shape) -> None:
        """This machine's measurement of the shape into COSTS_FILE (merged with what other
        processes wrote; an eager time measured before stays when this process ran none)."""
        name = self._name(shape)
        entry = dict(self.costs.get(name, {}))
        # the first compile on this machine is a compile; later ones load its code from the cache
        entry["load_seconds" if "compile_seconds" in entry else "compile_seconds"] = round(account.compile_seconds, 3)
        entry["compiled_ms"] = round(1e3 * statistics.median(account.compiled_timed), 4)
        if len(account.eager_recent) == MEASURE_STEPS:
            entry["eager_ms"] = round(1e3 * statistics.median(account.eager_recent), 4)
        self.costs[name] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            costs = _read_costs(self.path)
            costs[name] = entry
            scratch = self.path.with_name(f"{self.path.name}.{os.getpid()}")
            scratch.write_text(json.dumps(costs, indent=1, sort_keys=True))
            os.replace(scratch, self.path)
        except OSError:   # a read-only cache: the estimates stay this process's own
            pass


def _ledger(model: torch.nn.Module, key: tuple) -> Ledger:
    ledger = _state.ledgers.get(key)
    if ledger is None:
        while len(_state.ledgers) >= MODELS_KEPT:
            del _state.ledgers[next(iter(_state.ledgers))]
        ledger = _state.ledgers[key] = Ledger(model)
    return ledger


class CompiledVerify:
    """``step(tree, target_pass)`` (the loop's verify_step over one tree) with its tree padded to
    its bucket and its target pass compiled (``compiled_pass``), for the shapes the model's
    ``Ledger`` says have earned it (``mode``: NOW or EARNED); the others run the step eagerly and
    unpadded, timed. ``out`` is the output bookkeeping (its slack grows to the bucket); ``largest``
    the most tree nodes the cache holds; ``rows`` the cache's rows."""

    def __init__(self, step: Callable, verify: Callable, out, largest: int, model: torch.nn.Module, rows: int,
                 mode: str = NOW):
        self.step, self.verify, self.out, self.largest, self.rows = step, verify, out, largest, rows
        self.buffers: dict[tuple, TreeBuffers] = {}
        self.model = model_key(model)
        self.ledger, self.now = _ledger(model, self.model), mode == NOW
        self.cache_dir_set = False   # inductor pointed at its cache folder, before this call's first compile

    def _target_pass(self, target, cache, tree: Tree):
        return compiled_pass(self.verify, target, cache, tree, self.model)

    def __call__(self, tree: Tree) -> tuple:
        n = tree.size
        size = bucket(n, self.largest)
        shape = (size, layout(tree), tree.tokens.shape[0], self.rows)
        started = time.perf_counter()
        if _state.failure is not None or not (self.now or self.ledger.earned(shape)):
            outputs = self.step(tree)
            self.ledger.eager(shape, time.perf_counter() - started)
            return outputs
        if not self.cache_dir_set:
            _use_cache_dir()
            self.cache_dir_set = True
        if size == n:
            outputs = self.step(tree, self._target_pass)
        else:
            self.out.ensure_slack(size)
            buffers = self.buffers.get(shape[:2])   # (bucket, layout)
            if buffers is None:
                buffers = self.buffers[shape[:2]] = TreeBuffers(tree, size)
            buffers.fill(tree)
            outputs = self.step(buffers.tree, self._target_pass)
            outputs = tuple(o[:, :n] if o.dim() >= 2 else o for o in outputs)
        if _state.failure is None:
            self.ledger.compiled(shape, time.perf_counter() - started)
        return outputs
