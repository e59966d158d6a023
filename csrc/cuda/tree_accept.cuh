// tree_accept, CUDA kernel: framework-free (raw pointers, strides, a stream). The torch binding
// is tree_accept_binding.cpp; the specification is ps_kernels/reference/tree_accept.py.
#pragma once
#include "common.cuh"

namespace ps_kernels::cuda {

// The tree's child links live in shared memory (8 KiB at this bound); ops/tree_accept.py
// checks MAX_NODES, the same number.
constexpr int kTreeAcceptMaxNodes = 1024;

enum class TreeAcceptDtype { kFloat32, kFloat16, kBFloat16 };

struct TreeAcceptParams {
  const int64_t* tokens;        // [B, N] contiguous
  const int64_t* parents;       // row b at parents + b * parents_stride
  int64_t parents_stride;       // N, or 0 when the batch shares one tree
  const void* target;           // [B, N, V] of `dtype`, unit stride over V
  int64_t target_stride_b, target_stride_n;
  const void* draft_probs;      // like target, or nullptr (deterministic candidates)
  int64_t draft_stride_b, draft_stride_n;
  const double* uniforms;       // [B, N] contiguous; nullptr selects greedy mode
  double* scratch;              // [B, V] residual distributions (sample mode)
  int64_t batch;
  int32_t nodes, vocab;
  int64_t* accept_index;        // [B, N] out, contiguous
  int64_t* accept_lens;         // [B] out
  int64_t* next_token;          // [B] out
};

// One CTA per sequence. Returns the launch error (cudaSuccess when fine).
cudaError_t launch_tree_accept(const TreeAcceptParams& p, TreeAcceptDtype dtype, cudaStream_t stream);

}  // namespace ps_kernels::cuda
