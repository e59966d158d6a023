"""The drafters' training forwards: one pass over a whole sequence in which every anchor gets
its own group of extra slots under one dense mask (``group_layout``), so that the slots see
exactly what ``step()`` sees at inference (tests/test_drafters.py checks the agreement).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...drafters.network import DraftNetwork


def group_layout(n: int, anchors: torch.Tensor, slots: int):
    """Positions and mask of n real tokens followed by `slots` extra tokens per anchor, stored
    slot-major: slot j of the group of anchor g is row n + j * A + g (so the EAGLE-style
    drafter's pass j adds one contiguous block of rows).

    Real token t sees real tokens 0..t. Slot j (0-based) of the group anchored at a sits at
    position a + 1 + j and sees real tokens 0..a and slots 0..j of its own group; groups never
    see each other and real tokens never see slots. Returns positions [T] (int64) and
    allowed [T, T] (bool, True = may attend), T = n + A * slots.
    """
    dev = anchors.device
    A = anchors.shape[0]
    T = n + A * slots
    slot = torch.arange(A * slots, device=dev) // max(A, 1)
    group = torch.arange(A * slots, device=dev) % max(A, 1)
    positions = torch.cat([torch.arange(n, device=dev), anchors[group] + 1 + slot])
    allowed = torch.zeros(T, T, dtype=torch.bool, device=dev)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    allowed[n:, :n] = torch.arange(n, device=dev)[None, :] <= anchors[group][:, None]
    allowed[n:, n:] = (group[:, None] == group[None, :]) & (slot[None, :] <= slot[:, None])
    return positions, allowed


class MaskedAttention:
    """attend() for the training forward: SDPA with a dense bool mask. Keys are all rows given
    so far, so a later pass (the EAGLE-style drafter's next slot) attends the K/V of earlier
    passes; before each pass set `allowed` to the mask of its rows over all rows so far."""

    def __init__(self, num_heads: int, num_kv_heads: int):
        self.group = num_heads // num_kv_heads
        self.allowed: torch.Tensor | None = None
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, i, q, k, v):
        if i in self.kv:
            k = torch.cat([self.kv[i][0], k], dim=2)
            v = torch.cat([self.kv[i][1], v], dim=2)
        self.kv[i] = (k, v)
        # repeat the GQA groups: SDPA's enable_gqa is newer than the torch this package admits
        k = k.repeat_interleave(self.group, dim=1)
        v = v.repeat_interleave(self.group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)


def parallel_train_forward(net: DraftNetwork, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor):
    """Group-wise parallel training forward.

    tokens [B, n] / features [B, n, d]: real inputs (token x_{t+1} paired with feature f_t);
    anchors [A] int64: real indices that get a group of k - 1 mask slots.
    Returns the output features (real [B, n, d], slots [B, A, k-1, d]); ``net.logits`` of them
    gives the distributions (the caller applies the head only where it has labels: it is the
    costliest part). Real row t predicts the token after tokens[t] and the feature f_{t+1};
    slot j (0-based) of the group at anchor a predicts the token j + 1 places after that.
    """
    B, n = tokens.shape
    M = net.cfg.depth - 1
    A = anchors.shape[0]
    positions, allowed = group_layout(n, anchors, M)
    x = net.fuse(tokens, features)
    attend = MaskedAttention(net.cfg.num_heads, net.cfg.num_kv_heads)
    if not (M and A):
        slots = None
    else:
        slots = net.mask_inputs(x.dtype).repeat_interleave(A, dim=0).expand(B, -1, -1)   # slot-major rows
    if slots is not None and net.cfg.slot1 == "draft":
        # pass 1 over the real rows; pass 2 over the slots, slot 1 fed (the data's next token, the
        # drafter's own output feature at the anchor) plus its vector; anchors at n - 1 have no next
        # token and no slot labels, any token serves there
        attend.allowed = allowed[:n, :n]
        real = net.features_out(net.run(x, positions[:n].expand(B, -1), attend))
        fed = net.fuse(tokens[:, (anchors + 1).clamp(max=n - 1)], real[:, anchors])
        slots = torch.cat([slots[:, :A] + fed, slots[:, A:]], dim=1)
        attend.allowed = allowed[n:]
        g = net.features_out(net.run(slots, positions[n:].expand(B, -1), attend))
        return real, g.reshape(B, M, A, g.shape[-1]).transpose(1, 2)
    if slots is not None:
        x = torch.cat([x, slots], dim=1)
    attend.allowed = allowed
    g = net.features_out(net.run(x, positions.expand(B, -1), attend))
    return g[:, :n], g[:, n:].reshape(B, M, A, g.shape[-1]).transpose(1, 2)


def eagle_train_forward(net: DraftNetwork, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor):
    """Unrolled training forward; returns output features like parallel_train_forward.

    Slot j (0-based) of anchor a is fed (tokens[a + 1 + j], the drafter's output feature at the
    previous row of its chain) and predicts the token after that; anchors must satisfy
    a + k - 1 < n so every fed token exists.
    """
    B, n = tokens.shape
    M = net.cfg.depth - 1
    A = anchors.shape[0]
    if A and M and int(anchors.max()) + M >= n:
        raise ValueError(f"anchors: expected every anchor + {M} < n={n} (the tokens fed to the "
                         f"slots), got max anchor {int(anchors.max())}")
    positions, allowed = group_layout(n, anchors, M)
    attend = MaskedAttention(net.cfg.num_heads, net.cfg.num_kv_heads)
    attend.allowed = allowed[:n, :n]
    g = net.features_out(net.run(net.fuse(tokens, features), positions[:n].expand(B, -1), attend))
    real_g, prev = g, g[:, anchors]
    slots = []
    for j in range(M):
        rows = slice(n + j * A, n + (j + 1) * A)
        attend.allowed = allowed[rows, :rows.stop]
        h = net.run(net.fuse(tokens[:, anchors + 1 + j], prev), positions[rows].expand(B, -1), attend)
        prev = net.features_out(h)
        slots.append(prev)
    return real_g, torch.stack(slots, dim=2) if M else real_g.new_zeros(B, A, 0, real_g.shape[-1])


def train_forward(net: DraftNetwork, tokens: torch.Tensor, features: torch.Tensor, anchors: torch.Tensor):
    """The network's training forward by its kind (``parallel_train_forward`` or
    ``eagle_train_forward``): output features (real [B, n, d], slots [B, A, k-1, d])."""
    fwd = parallel_train_forward if net.cfg.parallel else eagle_train_forward
    return fwd(net, tokens, features, anchors)


class TrainingForward(nn.Module):
    """``train_forward`` as a module over the network (what DDP wraps)."""

    def __init__(self, net: DraftNetwork):
        super().__init__()
        self.net = net

    def forward(self, tokens, features, anchors):
        return train_forward(self.net, tokens, features, anchors)
