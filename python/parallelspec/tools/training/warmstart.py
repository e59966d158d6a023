"""Warm start: a new drafter network initialised from a trained one (`parallelspec train --init-from`).

Same layout: every tensor is copied. fused -> eagle3 (vLLM's layer): RMSNorm sits after the fc in
one and before the q/k/v in the other, so no exact conversion exists (drafters/network.py); the
closest linear one is fitted on the training data instead:

    fused   n = input_norm(W_fc [e; f])          q/k/v = W_{q,k,v} n        residual = W_fc [e; f]
    eagle3  h = [rms(e); rms(f)]                 q/k/v = W'_{q,k,v} h       residual = f

M (2d -> d) is the least-squares map with h M ~ n over the data's real rows, and W' = W M^T, so
layer 0's attention starts where the fused drafter's is; the mask feature is the u whose slot
input [rms(e(mask)); rms(u)] maps closest to the fused slots' mean normalised input; everything
after the attention (o_proj, norms, MLP, later layers) is copied. The residual stream starts at f
instead of W_fc [e; f]; that difference is what the training that follows has to absorb.
"""
from __future__ import annotations

import torch

from ...drafters.network import DraftNetwork


def check_compatible(net: DraftNetwork, source: DraftNetwork) -> None:
    """--init-from must be a drafter of the same shape (kind, depth, layers, head, width)."""
    a, b = net.cfg, source.cfg
    fields = ("parallel", "depth", "num_layers", "head", "hidden_size", "num_heads", "num_kv_heads",
              "intermediate_size", "slot1", "aux_layers")
    diff = [f"{f} {getattr(b, f)!r} (this run: {getattr(a, f)!r})" for f in fields if getattr(a, f) != getattr(b, f)]
    if b.layout != a.layout and (b.layout, a.layout) != ("fused", "eagle3"):
        diff.append(f"layout {b.layout!r} (this run: {a.layout!r}; only fused -> eagle3 converts)")
    if diff:
        raise ValueError(f"--init-from: expected a drafter of this run's shape, got {', '.join(diff)}")


@torch.no_grad()
def warm_start(net: DraftNetwork, source: DraftNetwork, tokens: torch.Tensor, features: torch.Tensor,
               ridge: float = 1e-3) -> dict:
    """Initialise `net` from `source` (both with the target attached, same draft vocabulary).
    tokens [N] / features [N, d]: real layer-0 inputs (e(x_{t+1}), f_t) to fit the fused -> eagle3
    map on. Returns {"fit_rel_err": relative error of that map (0 for a copy)}."""
    check_compatible(net, source)
    if not torch.equal(net.draft_to_target.cpu(), source.draft_to_target.cpu()):
        raise ValueError("--init-from: the run's draft vocabulary differs from the source drafter's "
                         "(train.py takes the source's when --init-from is given)")
    if source.cfg.layout == net.cfg.layout:
        net.load_state_dict({k: v.float() for k, v in source.state_dict().items()}, strict=False)
        return {"fit_rel_err": 0.0}
    layer0, src0 = net.layers[0], source.layers[0]
    layer0.input_norm.weight.fill_(1.0)
    layer0.hidden_norm.weight.fill_(1.0)
    e = source.embed_weight[tokens].float()
    f = features.float()
    n = src0.input_norm(source.fc(torch.cat([e, f], -1)).float())          # fused layer 0's normalised input
    h = torch.cat([layer0.input_norm(e), layer0.hidden_norm(f)], -1)         # eagle3's (norm weights 1)
    gram = h.T @ h
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0])
    M = torch.linalg.solve(gram, h.T @ n)                                    # [2d, d]: h M ~ n
    rel = float((h @ M - n).norm() / n.norm())
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(layer0, name).weight.copy_(getattr(src0, name).weight.float() @ M.T)
    for name in ("o_proj", "gate_proj", "up_proj", "down_proj"):
        getattr(layer0, name).weight.copy_(getattr(src0, name).weight)
    layer0.post_norm.weight.copy_(src0.post_norm.weight)
    for i in range(1, len(net.layers)):
        net.layers[i].load_state_dict(source.layers[i].state_dict())
    net.norm.weight.copy_(source.norm.weight)
    if net.mask_hidden is not None:
        d = f.shape[-1]
        slots = src0.input_norm(source.mask_embed.float()).mean(0)           # the fused slots' mean input
        e_mask = layer0.input_norm(net.embed_weight[net.cfg.mask_token_id].float())
        want = slots - e_mask @ M[:d]
        u = torch.linalg.lstsq(M[d:].T, want[:, None]).solution[:, 0]        # rms(u) M_f ~ want
        net.mask_hidden.copy_(u)
    if net.head is not None:
        net.head.load_state_dict(source.head.state_dict())
    return {"fit_rel_err": rel}
