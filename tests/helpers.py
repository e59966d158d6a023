"""Shared test helpers: which backends can run an op here, and on which device."""
import torch

from ps_kernels import _backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def runnable_backends(op: str, device: torch.device = DEVICE, include_reference: bool = False):
    """Backends (other than the reference) that can run `op` on `device`, each a pytest param
    that skips with the reason when unavailable, so a missing backend is visible in the report."""
    import pytest

    params = []
    for name in ("cpu", "triton", "cuda"):
        reason = _backend.why_unavailable(op, name, device)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    if include_reference:
        params.insert(0, pytest.param("reference", id="reference"))
    return params
