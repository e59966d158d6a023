// Torch binding of the CPU tree_accept kernel and the schema of ps_kernels_C::tree_accept.
// Inputs are validated in Python (ps_kernels/ops/tree_accept.py), which also allocates the
// outputs; the checks here guard the raw-pointer contract.
#include <ATen/Parallel.h>
#include <limits>
#include <torch/library.h>
#include <torch/types.h>

#include "tree_accept.h"

namespace {

template <typename T>
void run(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target,
         const std::optional<at::Tensor>& draft_probs, const at::Tensor& uniforms, const at::Tensor& scratch,
         at::Tensor& accept_index, at::Tensor& accept_lens, at::Tensor& next_token) {
  const int64_t B = tokens.size(0), N = tokens.size(1);
  const bool draft = draft_probs.has_value();
  ps_kernels::cpu::TreeAcceptArgs<T> a{tokens.data_ptr<int64_t>(),
                                       parents.data_ptr<int64_t>(),
                                       parents.dim() == 2 ? N : 0,
                                       target.data_ptr<T>(),
                                       target.stride(0),
                                       target.stride(1),
                                       draft ? draft_probs->data_ptr<T>() : nullptr,
                                       draft ? draft_probs->stride(0) : 0,
                                       draft ? draft_probs->stride(1) : 0,
                                       uniforms.defined() ? uniforms.data_ptr<double>() : nullptr,
                                       scratch.defined() ? scratch.data_ptr<double>() : nullptr,
                                       B,
                                       N,
                                       target.size(2),
                                       accept_index.data_ptr<int64_t>(),
                                       accept_lens.data_ptr<int64_t>(),
                                       next_token.data_ptr<int64_t>()};
  // A task of at least ~64k vocabulary entries per node: waking threads costs more than less.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / a.vocab);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) ps_kernels::cpu::tree_accept_sequence(a, b);
  });
}

void check_out(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.sizes() == shape, name,
              ": expected a contiguous int64 tensor of shape ", shape, ", got ", t.scalar_type(), " ", t.sizes());
}

void tree_accept_cpu(const at::Tensor& tokens, const at::Tensor& parents, const at::Tensor& target, bool sample,
                     const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
                     at::Tensor accept_index, at::Tensor accept_lens, at::Tensor next_token) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong, "tokens: expected int64 [B, N], got ",
              tokens.scalar_type(), " ", tokens.sizes());
  const int64_t B = tokens.size(0), N = tokens.size(1);
  TORCH_CHECK(N >= 1, "tokens: expected at least the root node");
  TORCH_CHECK(target.dim() == 3 && target.size(0) == B && target.size(1) == N && target.size(2) >= 1 &&
                  target.stride(2) == 1,
              "target: expected [B, N, V] with unit stride over V, got ", target.sizes(), " strides ", target.strides());
  TORCH_CHECK(target.size(2) <= std::numeric_limits<int32_t>::max(), "target: vocabulary too large");
  const auto tok = tokens.contiguous();
  const auto par = parents.to(at::kLong).contiguous();
  TORCH_CHECK((par.dim() == 1 && par.size(0) == N) || (par.dim() == 2 && par.size(0) == B && par.size(1) == N),
              "parents: expected [N] or [B, N], got ", parents.sizes());
  if (draft_probs.has_value()) {
    TORCH_CHECK(sample, "draft_probs: only used in sample mode");
    TORCH_CHECK(draft_probs->scalar_type() == target.scalar_type() && draft_probs->sizes() == target.sizes() &&
                    draft_probs->stride(2) == 1,
                "draft_probs: expected target's dtype and shape with unit stride over V");
  }
  at::Tensor u, scratch;
  if (sample) {
    TORCH_CHECK(uniforms.has_value() && uniforms->sizes() == tokens.sizes(), "uniforms: expected [B, N] in sample mode");
    u = uniforms->to(at::kDouble).contiguous();  // exact: the reference compares float(u) in float64
    scratch = at::empty({B, target.size(2)}, target.options().dtype(at::kDouble));
  }
  check_out("accept_index", accept_index, {B, N});
  check_out("accept_lens", accept_lens, {B});
  check_out("next_token", next_token, {B});
  switch (target.scalar_type()) {
    case at::kFloat:
      return run<float>(tok, par, target, draft_probs, u, scratch, accept_index, accept_lens, next_token);
    case at::kHalf:
      return run<at::Half>(tok, par, target, draft_probs, u, scratch, accept_index, accept_lens, next_token);
    case at::kBFloat16:
      return run<at::BFloat16>(tok, par, target, draft_probs, u, scratch, accept_index, accept_lens, next_token);
    default:
      TORCH_CHECK(false, "target: expected float32/float16/bfloat16, got ", target.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("tree_accept(Tensor tokens, Tensor parents, Tensor target, bool sample, Tensor? draft_probs, "
        "Tensor? uniforms, Tensor(a!) accept_index, Tensor(b!) accept_lens, Tensor(c!) next_token) -> ()");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CPU, m) { m.impl("tree_accept", &tree_accept_cpu); }
