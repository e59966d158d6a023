// Runtime CPU dispatch: the interface between the torch bindings (compiled once, for the
// baseline x86-64 / the toolchain's default target) and the kernels (compiled once per
// capability level in level_kernels.cpp, each level with its own flags and in its own
// namespace ps_kernels::cpu::level_<name>).
//
// Only plain data and declarations here: no inline functions, no templates with code. This
// header is included by both sides, and an inline function compiled with AVX-512 flags in a
// level's translation unit is a COMDAT copy the linker may keep for every caller (SIGILL on an
// AVX2 CPU). The bindings reach a level's code only through its LevelKernels table.
#pragma once
#include <cstdint>

namespace ps_kernels::cpu {

// Capability levels, lowest first. kLevelNames[i] names level i (what PS_KERNELS_CPU_CAPABILITY
// and ps_kernels.cpu_capability() use).
enum class Level : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kNumLevels = 4;
constexpr const char* kLevelNames[kNumLevels] = {"default", "avx2", "avx512", "avx512_bf16"};

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// skinny_linear: out[M, N] = x[M, K] w[N, K]^T (+ bias), see skinny_linear.h.
struct SkinnyArgs {
  const float* x;  // [M, K], or null when x_bf16 is given
  int64_t rows, k;
  const void* w;  // [N, K] contiguous, of dtype w_dtype
  DType w_dtype;
  const float* bias;  // [N] or null
  float* out;         // [M, N]
  int64_t n;
  // x as bf16 [M, K] instead of x (bf16 weights, on a level with skinny_bf16_pairs), else null:
  // bf16 pairs multiplied directly (skinny_linear.h, PS_SKINNY_BF16_PAIRS), the result written
  // to out_bf16 [M, N] (rounded once) instead of out
  const void* x_bf16 = nullptr;
  void* out_bf16 = nullptr;
};

// tree_attention / draft_attention, see attention/common.h. Pattern: draft when new_lens is set
// (real rows then num_masks mask slots, causal); else tree, with tree_words the packed
// [B, N, words_per_row] mask or null for causal. Features: window (0 = none), softcap (0 = off),
// sinks ([Hq] or null).
struct AttentionArgs {
  const void* q;  // [B, Hq, rows, D]
  const void* k_new;
  const void* v_new;  // [B, Hkv, rows, D]
  void* k_cache;
  void* v_cache;  // [B, Hkv, S, D]
  const int64_t* cache_lens;
  void* out;   // [B, Hq, rows, D]
  float* lse;  // [B, Hq, rows]
  int64_t batch, q_heads, kv_heads, rows, head_dim, cache_rows;
  float scale;
  DType dtype;
  const int64_t* tree_words;
  int64_t words_per_row;
  const int64_t* new_lens;
  int64_t num_masks;
  int64_t window;
  float softcap;
  const float* sinks;
};

// One level's kernels. Each runs a range of work on the calling thread; the bindings split
// the work over ATen's thread pool.
struct LevelKernels {
  Level level;
  // output columns [n_begin, n_end)
  void (*skinny_linear)(const SkinnyArgs& a, int64_t n_begin, int64_t n_end);
  bool skinny_bf16_pairs;  // skinny_linear takes SkinnyArgs::x_bf16 with a bf16 weight
  // work items [begin, end) of batch * kv_heads * chunks (item = sequence, KV head, chunk of
  // the group's query rows)
  void (*attention)(const AttentionArgs& a, int64_t chunks, int64_t begin, int64_t end);
};

// The active level's kernels (dispatch.cpp): chosen at first use from the CPU and
// PS_KERNELS_CPU_CAPABILITY; throws (c10::Error) when that variable cannot be honoured.
const LevelKernels& active_kernels();

}  // namespace ps_kernels::cpu
