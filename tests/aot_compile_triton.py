"""Compile every Triton kernel's AOT_SPECS for a real GPU target (default sm_90) without a GPU.
Run in a fresh process: TRITON_INTERPRET must be unset when the kernels are defined."""
import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def main(module: str, arch: int = 90) -> int:
    mod = importlib.import_module(f"ps_kernels.triton_kernels.{module}")
    specs = getattr(mod, "AOT_SPECS", [])
    if not specs:
        print(f"{module}: no AOT_SPECS", file=sys.stderr)
        return 1
    for fn, signature, constexprs in specs:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32))
        cubin = kernel.asm["cubin"]
        assert len(cubin) > 0
        print(f"{module}.{fn.__name__} {constexprs}: sm_{arch} cubin {len(cubin)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90))
