// Torch binding and schema of skinny_linear (the kernel is skinny_linear.h, compiled per
// capability level; this file reaches the active level's through dispatch.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "dispatch.h"

namespace {

namespace cpu = ps_kernels::cpu;

// x [M, K] (any float dtype; staged as fp32, except bf16 with a bf16 weight where the level multiplies
// bf16 pairs), weight [N, K] contiguous, bias [N] or None;
// returns [M, N] in x's dtype (fp32 sums rounded once).
at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: expected CPU tensors");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.is_contiguous() && x.size(1) == weight.size(1),
              "skinny_linear: expected x [M, K] and a contiguous weight [N, K], got ", x.sizes(), " and ",
              weight.sizes());
  const auto wt = weight.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16,
              "skinny_linear: weight: expected float32/float16/bfloat16, got ", wt);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const cpu::LevelKernels& kernels = cpu::active_kernels();
  // bf16 x and weight on a level that multiplies bf16 pairs directly: x as it is, else staged as fp32
  const bool pairs = kernels.skinny_bf16_pairs && x.scalar_type() == at::kBFloat16 && wt == at::kBFloat16;
  const at::Tensor xs = pairs ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N,
                "skinny_linear: bias: expected [", N, "], got ", bias->sizes());
    bf = bias->to(at::kFloat).contiguous();
  }
  // fp32, converted to x's dtype at the end; bf16 pairs write bf16 themselves (rounded once)
  at::Tensor out = at::empty({M, N}, x.options().dtype(pairs ? at::kBFloat16 : at::kFloat));
  if (M == 0 || N == 0) return out.to(x.scalar_type());
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  // >= 64 weight rows (and >= ~256 KiB of weight) per task: big contiguous streams per thread
  const int64_t grain = std::max<int64_t>(64, (int64_t{256} << 10) / std::max<int64_t>(1, K * weight.element_size()));
  // Threads split the rows in units of kUnit, so that every row's tile (and with it the order of
  // its sums) is the same at any thread count: skinny_linear.h's one-row tiles are 8 rows tall and
  // its row remainders sum in another order, which a split at an odd row moved with the threads.
  constexpr int64_t kUnit = 8;
  const cpu::SkinnyArgs args{pairs ? nullptr : xs.data_ptr<float>(), M, K, weight.data_ptr(),
                             wt == at::kFloat ? cpu::DType::kFloat : wt == at::kHalf ? cpu::DType::kHalf : cpu::DType::kBFloat16,
                             bp, pairs ? nullptr : out.data_ptr<float>(), N, pairs ? xs.data_ptr() : nullptr,
                             pairs ? out.data_ptr() : nullptr};
  at::parallel_for(0, (N + kUnit - 1) / kUnit, (grain + kUnit - 1) / kUnit, [&](int64_t begin, int64_t end) {
    kernels.skinny_linear(args, begin * kUnit, std::min(end * kUnit, N));
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ps_kernels_C, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(ps_kernels_C, CPU, m) { m.impl("skinny_linear", &skinny_linear_cpu); }
