// tree_attention, CUDA launcher: the shared flash-decoding core (attention.cuh) with the
// packed tree mask, or the causal mask when tree_mask is null. Torch binding:
// tree_attention_binding.cpp.
#include "attention.cuh"

namespace ps_kernels::cuda {

cudaError_t launch_tree_attention(const AttentionParams& p, cudaStream_t stream) {
  if (p.tree_mask != nullptr) return attn::launch_attention<attn::kTree>(p, stream);
  return attn::launch_attention<attn::kCausal>(p, stream);
}

}  // namespace ps_kernels::cuda
