"""Argument checks shared by every op. Each error names the argument, what was expected and
what came, and is raised before anything is written."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, value, *, ndim: int | Sequence[int] | None = None,
           dtypes: Sequence[torch.dtype] | None = None, device: torch.device | None = None,
           contiguous: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            raise ValueError(f"{name}: expected a tensor of rank {' or '.join(map(str, allowed))}, "
                             f"got rank {value.dim()} (shape {tuple(value.shape)})")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_fmt_dtypes(dtypes)}, got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where the other inputs are), got {value.device}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {value.stride()} "
                         f"for shape {tuple(value.shape)}")
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """Check value.shape against `expected` (None = any size)."""
    got = tuple(value.shape)
    ok = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not ok:
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {exp}{' ' + what if what else ''}, got {got}")


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(f"{n}: expected a tensor on {first} (where {first_name} is), got {d}")
    return first
