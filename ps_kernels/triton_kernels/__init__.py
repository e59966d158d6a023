"""Triton kernels. Each module has private ``_name_kernel`` functions, a launcher, and
``AOT_SPECS``: (kernel, signature, constexprs) triples that tests compile ahead of time for
sm_90 so a kernel that only works in the interpreter is caught."""
import contextlib

MODULES = ("kv_rollback", "tree_attention", "draft_attention", "tree_accept")


def on_device(t):
    """A context that makes t's GPU the current device for the launches inside it: Triton
    launches on the current device, which a tensor on cuda:1 does not set (a no-op on CPU
    tensors, the interpreter's)."""
    import torch

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
