// draft_attention, CUDA launcher: the shared flash-decoding core (attention.cuh) with the
// drafter's real-token / mask-slot pattern computed from indices. Torch binding:
// draft_attention_binding.cpp.
#include "attention.cuh"

namespace ps_kernels::cuda {

cudaError_t launch_draft_attention(const AttentionParams& p, cudaStream_t stream) {
  return attn::launch_attention<attn::kDraft>(p, stream);
}

}  // namespace ps_kernels::cuda
