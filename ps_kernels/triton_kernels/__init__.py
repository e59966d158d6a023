"""Triton kernels. Each module has private ``_name_kernel`` functions, a launcher, and
``AOT_SPECS``: (kernel, signature, constexprs) triples that tests compile ahead of time for
sm_90 so a kernel that only works in the interpreter is caught."""
MODULES = ("kv_rollback", "tree_attention", "draft_attention", "tree_accept")
