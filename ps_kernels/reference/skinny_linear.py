"""Reference skinny_linear: ``x W^T + b`` with products and sums in fp32, rounded once to x's dtype."""
from __future__ import annotations

import torch


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
