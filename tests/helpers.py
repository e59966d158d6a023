"""Shared test helpers: which backends can run an op here, and on which device."""
import torch

from ps_kernels import _backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ops whose native CPU kernel is compiled per capability level (csrc/cpu/level_kernels.cpp);
# kv_rollback and tree_accept are compiled once, for the baseline
LEVEL_OPS = ("skinny_linear", "tree_attention", "draft_attention")


def cpu_level_params(value=None):
    """One pytest param per CPU capability level this machine runs (compiled into the native
    library and supported by the CPU), id ``cpu-<level>``, marked ``cpu_capability(level)``:
    conftest's fixture forces that level around the test, so a wide CPU also tests the narrow
    levels' code. The param's value is `value`, or the level's name when None."""
    import pytest

    return [pytest.param(level if value is None else value, id=f"cpu-{level}",
                         marks=pytest.mark.cpu_capability(level))
            for level in _backend.runnable_cpu_levels()]


def runnable_backends(op: str, device: torch.device = DEVICE, include_reference: bool = False):
    """Backends (other than the reference) that can run `op` on `device`, each a pytest param
    that skips with the reason when unavailable, so a missing backend is visible in the report.
    The native CPU backend gives one param per capability level (cpu_level_params)."""
    import pytest

    params = []
    for name in ("cpu", "triton", "cuda"):
        reason = _backend.why_unavailable(op, name, device)
        if name == "cpu" and reason is None and device.type == "cpu" and op in LEVEL_OPS:
            params += cpu_level_params("cpu")
            continue
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    if include_reference:
        params.insert(0, pytest.param("reference", id="reference"))
    return params


def chi_square_terms(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square statistic and degrees of freedom of observed `counts` against
    `expected_probs` (same shape), cells with expected count < 5 pooled into one. Sums of these
    over independent groups give one pooled test (chi_square_pvalue)."""
    counts = counts.flatten().double()
    expected = expected_probs.flatten().double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def chi_square_pvalue(stat: float, df: int) -> float:
    """P(chi-square with df degrees of freedom >= stat)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
