// The CPU kernels of one capability level: CMakeLists.txt compiles this file once per level
// (default / avx2 / avx512 / avx512_bf16), each time with that level's flags and
// PS_CPU_LEVEL = level_<name>, the namespace all of its code lives in (simd.h says why).
// Framework-free: no torch header may be included here (its inline code would be compiled
// with this level's flags). dispatch.cpp picks one level's table at run time.
#include <algorithm>
#include <cstdint>

#include "attention/driver.h"
#include "dispatch.h"
#include "skinny_linear.h"

namespace ps_kernels::cpu::PS_CPU_LEVEL {

namespace {

void skinny_linear_range(const SkinnyArgs& a, int64_t n_begin, int64_t n_end) {
  switch (a.w_dtype) {
    case DType::kFloat:
      skinny::rows_range(a.x, a.rows, a.k, static_cast<const float*>(a.w), a.bias, a.out, a.n, n_begin, n_end);
      break;
    case DType::kHalf:
      skinny::rows_range(a.x, a.rows, a.k, static_cast<const Half*>(a.w), a.bias, a.out, a.n, n_begin, n_end);
      break;
    case DType::kBFloat16:
#if defined(PS_SKINNY_BF16_PAIRS)
      if (a.x_bf16 != nullptr) {  // bf16 pairs multiplied directly (skinny_linear.h)
        skinny::rows_range(static_cast<const BFloat16*>(a.x_bf16), a.rows, a.k, static_cast<const BFloat16*>(a.w),
                           a.bias, static_cast<BFloat16*>(a.out_bf16), a.n, n_begin, n_end);
        break;
      }
#endif
      skinny::rows_range(a.x, a.rows, a.k, static_cast<const BFloat16*>(a.w), a.bias, a.out, a.n, n_begin, n_end);
      break;
  }
}

template <typename T>
void attention_typed(const AttentionArgs& a, int64_t chunks, int64_t begin, int64_t end) {
  namespace attn = attention;
  const attn::Problem<T> p{static_cast<const T*>(a.q),
                           static_cast<const T*>(a.k_new),
                           static_cast<const T*>(a.v_new),
                           static_cast<T*>(a.k_cache),
                           static_cast<T*>(a.v_cache),
                           a.cache_lens,
                           static_cast<T*>(a.out),
                           a.lse,
                           a.batch, a.q_heads, a.kv_heads, a.rows, a.head_dim, a.cache_rows,
                           a.scale,
                           a.window,
                           a.softcap,
                           a.sinks};
  if (a.new_lens != nullptr) {  // draft: real rows 0..r-1 then the mask slots R..T-1, causal over that order
    const int64_t* lens = a.new_lens;
    const int64_t masks = a.num_masks, R = a.rows - masks;
    const auto seq_rows = [=](int64_t b) {
      const int64_t r = lens[b];
      return attn::SeqRows{r + masks, r, R - r, r};
    };
    attn::attention_items(p, seq_rows, attn::CausalPolicy{}, chunks, begin, end);
    return;
  }
  const int64_t N = a.rows;
  const auto seq_rows = [N](int64_t) { return attn::SeqRows{N, N, 0, N}; };
  if (a.tree_words != nullptr) {
    attn::attention_items(p, seq_rows, attn::TreeBitsPolicy{a.tree_words, N, a.words_per_row}, chunks, begin, end);
  } else {
    attn::attention_items(p, seq_rows, attn::CausalPolicy{}, chunks, begin, end);
  }
}

void attention_range(const AttentionArgs& a, int64_t chunks, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat: attention_typed<float>(a, chunks, begin, end); break;
    case DType::kHalf: attention_typed<Half>(a, chunks, begin, end); break;
    case DType::kBFloat16: attention_typed<BFloat16>(a, chunks, begin, end); break;
  }
}

// What this translation unit was compiled for (a one-level build names itself by its flags).
constexpr Level compiled_level() {
#if defined(__AVX512BF16__) && defined(PS_CPU_AVX512)
  return Level::kAvx512Bf16;
#elif defined(PS_CPU_AVX512)
  return Level::kAvx512;
#elif defined(PS_CPU_AVX2)
  return Level::kAvx2;
#else
  return Level::kDefault;
#endif
}

}  // namespace

// The table dispatch.cpp reads; the only symbol of this level that other code names.
const LevelKernels& kernels() {
#if defined(PS_SKINNY_BF16_PAIRS)
  constexpr bool bf16_pairs = true;
#else
  constexpr bool bf16_pairs = false;
#endif
  static const LevelKernels table{compiled_level(), &skinny_linear_range, bf16_pairs, &attention_range};
  return table;
}

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL
