"""tree_accept: which path of a drafted token tree the target model accepts, on the device.

Tree convention (docs/DESIGN.md): node 0 is the root (the last committed token), nodes are in
topological order, ``parents[0] = -1`` and ``0 <= parents[i] < i``; the children of a node are
tried in index order. The specification is ``ps_kernels.reference.tree_accept``.

Every backend walks the tree on the device, one sequence per thread (C++) or per program/CTA
(Triton/CUDA), with the argmax or the V-wide sums done only at the nodes on the walked path: no
host sync per node. Sampling arithmetic is in float64, as in the reference, so the same uniforms
give the same tokens on every backend (up to float64 rounding at a decision boundary).

``MAX_NODES`` bounds N: the CUDA kernel keeps a tree's parents, child links and tokens in shared
memory and the Triton kernel keeps the parents of one tree in registers; 1024 nodes is far beyond
the trees speculative decoding verifies (tens of nodes) and fits both.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _checks
from .. import reference as _ref

OP = "tree_accept"
MODES = ("greedy", "sample")
MAX_NODES = 1024


@torch.library.custom_op("ps_kernels::tree_accept", mutates_args=())
def _tree_accept_op(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor, sample: bool,
                    draft_probs: Optional[torch.Tensor], uniforms: Optional[torch.Tensor],
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "reference":
        return _ref.tree_accept(tokens, parents, target, "sample" if sample else "greedy", draft_probs, uniforms)
    # The kernels read the vocabulary dimension with unit stride; batch and node strides are free
    # (a target expanded over the batch is not copied).
    if target.stride(-1) != 1:
        target = target.contiguous()
    if draft_probs is not None and draft_probs.stride(-1) != 1:
        draft_probs = draft_probs.contiguous()
    if backend == "triton":
        from ..triton_kernels.tree_accept import tree_accept as _triton
        return _triton(tokens, parents, target, sample, draft_probs, uniforms)
    if backend in ("cpu", "cuda"):
        B, N = tokens.shape
        accept_index = torch.empty(B, N, dtype=torch.int64, device=tokens.device)
        accept_lens = torch.empty(B, dtype=torch.int64, device=tokens.device)
        next_token = torch.empty(B, dtype=torch.int64, device=tokens.device)
        torch.ops.ps_kernels_C.tree_accept(tokens, parents, target, sample, draft_probs, uniforms,
                                           accept_index, accept_lens, next_token)
        return accept_index, accept_lens, next_token
    raise AssertionError(backend)  # resolved by _backend.select; anything else is a bug


@_tree_accept_op.register_fake
def _(tokens, parents, target, sample, draft_probs, uniforms, backend):
    B, N = tokens.shape
    return (tokens.new_empty((B, N), dtype=torch.int64), tokens.new_empty((B,), dtype=torch.int64),
            tokens.new_empty((B,), dtype=torch.int64))


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _at(name: str, index: tuple[int, ...]) -> str:
    return f"{name}[{', '.join(map(str, index))}]"


def _validate(tokens, parents, target, mode, draft_probs, uniforms, check_values: bool) -> None:
    _checks.tensor("tokens", tokens, ndim=2, dtypes=(torch.int64,))
    dev = tokens.device
    _checks.tensor("parents", parents, ndim=(1, 2), dtypes=_checks.INDEX_DTYPES, device=dev)
    _checks.tensor("target", target, ndim=3, dtypes=_checks.FLOAT_DTYPES, device=dev)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    B, N = tokens.shape
    if N < 1:
        raise ValueError(f"tokens: expected at least one node (the root) per tree, got shape {tuple(tokens.shape)}")
    if N > MAX_NODES:
        raise ValueError(f"tokens: expected at most {MAX_NODES} tree nodes (N), got N = {N}")
    _checks.shape("parents", parents, (N,) if parents.dim() == 1 else (B, N), "(one parent per node of tokens)")
    _checks.shape("target", target, (B, N, None), "(logits or probabilities per node of tokens)")
    V = target.shape[2]
    if V < 1:
        raise ValueError(f"target: expected a vocabulary of at least one token, got shape {tuple(target.shape)}")
    if mode == "greedy":
        for name, value in (("draft_probs", draft_probs), ("uniforms", uniforms)):
            if value is not None:
                raise ValueError(f"{name}: expected None with mode='greedy' (only sampling uses it), "
                                 f"got a {type(value).__name__}")
    if draft_probs is not None:
        _checks.tensor("draft_probs", draft_probs, ndim=3, dtypes=(target.dtype,), device=dev)
        _checks.shape("draft_probs", draft_probs, (B, N, V), "(like target)")
    if uniforms is not None:
        _checks.tensor("uniforms", uniforms, ndim=2, dtypes=(torch.float32, torch.float64), device=dev)
        _checks.shape("uniforms", uniforms, (B, N), "(one per node of tokens)")
    if not check_values:
        return
    par = parents.to(torch.int64).reshape(-1, N).cpu()
    rows = "parents[0]" if parents.dim() == 1 else "parents[b, 0]"
    if (par[:, 0] != -1).any():
        b = _first_bad(par[:, 0] != -1)[0]
        got = _at("parents", (b, 0) if parents.dim() == 2 else (0,))
        raise ValueError(f"parents: not a tree: expected {rows} = -1 (node 0 is the root), got {got} = {int(par[b, 0])}")
    node = torch.arange(N)
    bad = (par[:, 1:] < 0) | (par[:, 1:] >= node[1:])
    if bad.any():
        b, i = _first_bad(bad)
        i += 1
        where = (b, i) if parents.dim() == 2 else (i,)
        raise ValueError(f"parents: not a tree: expected 0 <= parents[i] < i (nodes in topological order), "
                         f"got {_at('parents', where)} = {int(par[b, i])}")
    bad = (tokens < 0) | (tokens >= V)
    if bad.any():
        where = _first_bad(bad)
        raise ValueError(f"tokens: expected token ids in [0, {V}) (V = target.shape[2]), "
                         f"got {_at('tokens', where)} = {int(tokens[where])}")
    for name, value in (("target", target), ("draft_probs", draft_probs)):
        if value is None:
            continue
        if value.isnan().any():
            raise ValueError(f"{name}: expected no NaN, got NaN at {_at(name, _first_bad(value.isnan()))}")
        if mode == "sample" and (value < 0).any():
            where = _first_bad(value < 0)
            raise ValueError(f"{name}: expected probabilities >= 0 in sample mode, got {_at(name, where)} = "
                             f"{float(value[where])}")
    if uniforms is not None:
        bad = ~((uniforms >= 0) & (uniforms < 1))
        if bad.any():
            where = _first_bad(bad)
            raise ValueError(f"uniforms: expected values in [0, 1), got {_at('uniforms', where)} = {float(uniforms[where])}")


def tree_accept(tokens: torch.Tensor, parents: torch.Tensor, target: torch.Tensor, *, mode: str = "greedy",
                draft_probs: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
                generator: torch.Generator | None = None, backend: str | None = None,
                validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify a token tree against the target: the accepted path and the next token.

    Args:
        tokens: ``[B, N]`` int64 node tokens; node 0 is the root (the last committed token).
            N is at most ``MAX_NODES`` (1024).
        parents: ``[N]`` (one tree for the batch) or ``[B, N]`` int32/int64, ``parents[..., 0] = -1``
            and ``0 <= parents[i] < i``.
        target: ``[B, N, V]`` fp32/fp16/bf16: greedy, the target's logits at each node; sample, its
            processed probabilities (temperature/top-k/top-p applied; need not be normalised).
        mode: ``"greedy"`` (follow the argmax) or ``"sample"`` (lossless recursive rejection).
        draft_probs: sample mode, ``[B, N, V]`` like target: the distribution node c's token was
            drawn from; None when candidates were chosen deterministically (top-k, n-gram).
        uniforms: sample mode, ``[B, N]`` fp32/fp64 in [0, 1): ``uniforms[b, c]`` decides child c,
            ``uniforms[b, 0]`` the final draw. None draws ``torch.rand(B, N, generator=generator)``
            on the tokens' device (no host sync).
        generator: the ``torch.Generator`` for those uniforms.
        backend: ``None``/``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
        validate: check values (a tree, token ids in range, no NaN, probabilities >= 0, uniforms
            in [0, 1); one host sync). Pass False in the decoding loop; with invalid values the
            kernels stay in bounds but the result is unspecified.

    Returns:
        ``accept_index [B, N]`` int64 (the accepted nodes root first, then -1), ``accept_lens [B]``
        int64 (>= 1, the root counts), ``next_token [B]`` int64 (the bonus token, the next root).

    Example::

        >>> tokens = torch.tensor([[7, 3, 5, 2]])     # root 7; children 3 and 5; 2 under 5
        >>> parents = torch.tensor([-1, 0, 0, 2])
        >>> target = torch.zeros(1, 4, 10)
        >>> target[0, 0, 5] = target[0, 2, 2] = target[0, 3, 9] = 1.0
        >>> tree_accept(tokens, parents, target)
        (tensor([[ 0,  2,  3, -1]]), tensor([3]), tensor([9]))
    """
    _validate(tokens, parents, target, mode, draft_probs, uniforms, validate)
    sample = mode == "sample"
    if sample and uniforms is None:
        uniforms = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    name = _backend.select(OP, tokens.device, backend)
    return _tree_accept_op(tokens, parents, target, sample, draft_probs, uniforms, name)
