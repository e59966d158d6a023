// Torch binding of the CUDA tree_accept kernel (built only with a CUDA toolkit and CUDA torch).
// The schema is defined in csrc/cpu/tree_accept.cpp; Python validates inputs and allocates outputs.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <limits>
#include <torch/library.h>
#include <torch/types.h>

#include "tree_accept.cuh"

namespace {

void check_out(const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == at::kLong && t.is_contiguous() && t.sizes() == shape, name,
              ": expected a contiguous int64 tensor of shape ", shape, " on ", device, ", got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

void tree_accept_cuda(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target, bool sample,
                      const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
                      at::Tensor accept_index, at::Tensor accept_lens, at::Tensor next_token) {
  TORCH_CHECK(tokens.is_cuda() && tokens.dim() == 2 && tokens.scalar_type() == at::kLong,
              "tokens: expected a CUDA int64 tensor [B, N], got ", tokens.scalar_type(), " ", tokens.sizes());
  const int64_t B = tokens.size(0), N = tokens.size(1);
  TORCH_CHECK(N >= 1 && N <= ps_kernels::cuda::kTreeAcceptMaxNodes, "tokens: expected 1 to ",
              ps_kernels::cuda::kTreeAcceptMaxNodes, " nodes, got ", N);
  TORCH_CHECK(target.device() == tokens.device() && target.dim() == 3 && target.size(0) == B && target.size(1) == N &&
                  target.size(2) >= 1 && target.size(2) <= std::numeric_limits<int32_t>::max() && target.stride(2) == 1,
              "target: expected [B, N, V] on ", tokens.device(), " with unit stride over V, got ", target.sizes(),
              " strides ", target.strides());
  const c10::cuda::CUDAGuard guard(tokens.device());
  ps_kernels::cuda::TreeAcceptDtype dtype;
  switch (target.scalar_type()) {
    case at::kFloat: dtype = ps_kernels::cuda::TreeAcceptDtype::kFloat32; break;
    case at::kHalf: dtype = ps_kernels::cuda::TreeAcceptDtype::kFloat16; break;
    case at::kBFloat16: dtype = ps_kernels::cuda::TreeAcceptDtype::kBFloat16; break;
    default: TORCH_CHECK(false, "target: expected float32/float16/bfloat16, got ", target.scalar_type());
  }
  const auto tok = tokens.contiguous();
  const auto par = parents.to(at::kLong).contiguous();
  TORCH_CHECK(par.device() == tokens.device() &&
                  ((par.dim() == 1 && par.size(0) == N) || (par.dim() == 2 && par.size(0) == B && par.size(1) == N)),
              "parents: expected [N] or [B, N] on ", tokens.device(), ", got ", parents.sizes(), " on ", parents.device());
  if (draft_probs.has_value()) {
    TORCH_CHECK(sample, "draft_probs: only used in sample mode");
    TORCH_CHECK(draft_probs->device() == tokens.device() && draft_probs->scalar_type() == target.scalar_type() &&
                    draft_probs->sizes() == target.sizes() && draft_probs->stride(2) == 1,
                "draft_probs: expected target's device, dtype and shape with unit stride over V");
  }
  at::Tensor u, scratch;
  if (sample) {
    TORCH_CHECK(uniforms.has_value() && uniforms->device() == tokens.device() && uniforms->sizes() == tokens.sizes(),
                "uniforms: expected [B, N] on ", tokens.device(), " in sample mode");
    u = uniforms->to(at::kDouble).contiguous();  // exact: the reference compares float(u) in float64
    scratch = at::empty({B, target.size(2)}, target.options().dtype(at::kDouble));
  }
  check_out("accept_index", accept_index, {B, N}, tokens.device());
  check_out("accept_lens", accept_lens, {B}, tokens.device());
  check_out("next_token", next_token, {B}, tokens.device());
  const bool draft = draft_probs.has_value();
  ps_kernels::cuda::TreeAcceptParams p{tok.data_ptr<int64_t>(),
                                       par.data_ptr<int64_t>(),
                                       par.dim() == 2 ? N : 0,
                                       target.data_ptr(),
                                       target.stride(0),
                                       target.stride(1),
                                       draft ? draft_probs->data_ptr() : nullptr,
                                       draft ? draft_probs->stride(0) : 0,
                                       draft ? draft_probs->stride(1) : 0,
                                       sample ? u.data_ptr<double>() : nullptr,
                                       sample ? scratch.data_ptr<double>() : nullptr,
                                       B,
                                       static_cast<int32_t>(N),
                                       static_cast<int32_t>(target.size(2)),
                                       accept_index.data_ptr<int64_t>(),
                                       accept_lens.data_ptr<int64_t>(),
                                       next_token.data_ptr<int64_t>()};
  const cudaError_t err = ps_kernels::cuda::launch_tree_accept(p, dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "tree_accept CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(ps_kernels_C, CUDA, m) { m.impl("tree_accept", &tree_accept_cuda); }
