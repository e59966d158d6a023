"""kv_rollback in Triton: one program per (plane, sequence, head) slab, all layers in one launch.

The cache is viewed as same-width integers (int16 for fp16/bf16, int32 for fp32), so the
kernel moves raw bits and works for every float dtype, in the interpreter too."""
import torch
import triton
import triton.language as tl

from . import on_device


@triton.jit(do_not_specialize=["heads", "batch", "seq", "accept_stride"])   # sizes: one compile, any shape
def _kv_rollback_kernel(cache_ptr, cache_lens_ptr, accept_index_ptr, accept_lens_ptr,
                        heads, batch, seq, accept_stride,
                        D: tl.constexpr, BLOCK_D: tl.constexpr):
    slab = tl.program_id(0).to(tl.int64)
    b = (slab // heads) % batch
    n = tl.load(accept_lens_ptr + b)
    base = tl.load(cache_lens_ptr + b)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    rows_ptr = cache_ptr + slab * seq * D
    # Rows move in increasing i and src >= dst (accept_index strictly increasing); each column
    # is loaded and stored by the same lane, so the forward walk never clobbers a pending source.
    for i in range(0, n):
        src = base + tl.load(accept_index_ptr + b * accept_stride + i)
        dst = base + i
        row = tl.load(rows_ptr + src * D + cols, mask=cmask)
        tl.store(rows_ptr + dst * D + cols, row, mask=cmask)
        tl.debug_barrier()


@triton.jit
def _advance_lens_kernel(cache_lens_ptr, accept_lens_ptr, batch, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < batch
    tl.store(cache_lens_ptr + offs, tl.load(cache_lens_ptr + offs, mask=m) + tl.load(accept_lens_ptr + offs, mask=m), mask=m)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def kv_rollback(kv_cache, cache_lens, accept_index, accept_lens):
    L, _, B, H, S, D = kv_cache.shape
    raw = kv_cache.view(_BITS[kv_cache.element_size()])
    idx = accept_index.to(torch.int64).contiguous()
    lens = accept_lens.to(torch.int64).contiguous()
    slabs = L * 2 * B * H
    with on_device(kv_cache):
        if slabs:
            _kv_rollback_kernel[(slabs,)](raw, cache_lens, idx, lens, H, B, S, idx.shape[1],
                                          D=D, BLOCK_D=triton.next_power_of_2(D))
        _advance_lens_kernel[(triton.cdiv(B, 128),)](cache_lens, lens, B, BLOCK=128)


AOT_SPECS = [
    (_kv_rollback_kernel,
     {"cache_ptr": "*i16", "cache_lens_ptr": "*i64", "accept_index_ptr": "*i64", "accept_lens_ptr": "*i64",
      "heads": "i32", "batch": "i32", "seq": "i32", "accept_stride": "i32", "D": "constexpr", "BLOCK_D": "constexpr"},
     {"D": 64, "BLOCK_D": 64}),
    (_kv_rollback_kernel,
     {"cache_ptr": "*i32", "cache_lens_ptr": "*i64", "accept_index_ptr": "*i64", "accept_lens_ptr": "*i64",
      "heads": "i32", "batch": "i32", "seq": "i32", "accept_stride": "i32", "D": "constexpr", "BLOCK_D": "constexpr"},
     {"D": 80, "BLOCK_D": 128}),
    (_advance_lens_kernel,
     {"cache_lens_ptr": "*i64", "accept_lens_ptr": "*i64", "batch": "i32", "BLOCK": "constexpr"},
     {"BLOCK": 128}),
]
