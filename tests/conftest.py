"""Test setup. On a machine without a GPU, Triton kernels run in the interpreter: the flag
must be set before any Triton kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=10, deadline=None)
# the lent GPU's check (benchmarks/gpu_check.sh): few draws, fixed, so the op tests fit their stage
settings.register_profile("gpu", max_examples=6, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_capability(level): run with the native CPU kernels forced to level")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_capability(request):
    """Force the native CPU kernels' capability level of a test marked cpu_capability(level)
    (helpers.cpu_level_params), restoring the automatic choice afterwards."""
    mark = request.node.get_closest_marker("cpu_capability")
    if mark is None:
        yield
        return
    from ps_kernels import _backend
    with _backend.force_cpu_capability(mark.args[0]):
        yield


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add overhead (and scheduling stalls on a shared
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
