// Attention CPU core shared by tree_attention and draft_attention: framework-free (raw
// pointers, sizes); the torch bindings are tree_attention.cpp and draft_attention.cpp. This
// folder: common.h (the problem, the scratch, the operand formats and the one contract of each
// stage), one file per instruction set implementing the stages (avx512.h, avx2.h, portable.h)
// and driver.h (the staged driver, written once over those contracts).
//
// Both ops are "queries over a cache prefix plus a few new keys under a pattern". Per sequence
// the new rows of q / k_new / v_new are compacted to n rows by (split, skip): compact index i
// is row i for i < split and row i + skip after it. Tree: n = N, split = N, skip = 0. Draft:
// the new_lens[b] = r real rows then the M mask slots (rows R..T-1), so split = r,
// skip = R - r, and the drafter's pattern (real t sees reals 0..t; slot j sees every real and
// slots 0..j) is exactly causal over compact indices. A query attends every prefix row plus
// the new keys its mask policy allows: CausalPolicy or TreeBitsPolicy (packed int64 bits).
//
// Optional features (off: no work added). A sliding window: compact index i sits at position
// prefix + depth(i) (the policy's depth: i when causal, its ancestor count for a tree) and
// prefix row r at r; a query sees a key only if their positions differ by less than the
// window. Each work item starts its prefix at the first row any of its queries sees, so rows
// outside every query's window are never read. Soft-capping: scores pass through
// cap * tanh(s / cap) before the softmax. Sinks: one logit per query head joins each row's
// softmax denominator when the output is normalised.
//
// One work item = (sequence b, KV head g, a chunk of the group's query rows); a chunk holds
// query rows rho = i * G + h (node-major, so rows of one node share their mask) of ALL G query
// heads of the group, and each key block (kKeyBlock rows of K and V, staged once) serves every
// query row of the chunk. Online softmax in fp32, in the log2 domain (scores carry
// scale * log2(e)), so exp is exp2.
//
// The stages, one contract each for every instruction set (s, p: [kRowTile][kKeyBlock] tiles;
// m, l, alpha: per row; o: [rows][dp], dp = D rounded up to 16):
//   qk(Q q, int mr, K k, float* s)
//       s[r * 32 + c] = log2(e) * scale * (q_r . k_c) for rows r < mr and keys c < 32 (keys
//       past the block's kb are zero-padded: any finite value, the softmax masks them).
//   softcap(float* s, int mr, float cap)
//       s = cap * tanh(s / cap) over the mr x 32 scores (cap in the scores' log2 domain).
//   softmax(const float* s, const uint32_t* bits, int mr, float* m, float* l, float* p, float* alpha)
//       online update of each row's max m and denominator l (kSumLanes partial sums) over the
//       keys whose bit is set in bits[r]: m_new = max(m, allowed scores), p = exp2(s - m_new)
//       (0 where not allowed), l = l * alpha + p, alpha[r] = exp2(m_old - m_new); a row with
//       nothing allowed keeps m and l, gets p = 0 and alpha = 1.
//   pv(float* o, int mr, int64_t d, int64_t dp, const float* p, const float* alpha, V v)
//       o_r = o_r * alpha[r] + sum_{c < kb} p[r * 32 + c] v_c over the columns < d.
// Q / K / V are one of the operand formats below; the staging functions that make them:
//   build_kt(krow, kb, d, kt) (K: KCols) and stage_v(vsrc, kb, d, dp, buf, vrow) (V: VRows),
//   and, on the avx512_bf16 level, build_kt_pairs / stage_v_pairs (KPairs / VPairs).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../simd.h"

#define PS_ATTENTION_INLINE PS_CPU_INLINE
#define PS_ATTENTION_UNROLL PS_CPU_UNROLL

namespace ps_kernels::cpu::PS_CPU_LEVEL::attention {

using PS_CPU_LEVEL::BFloat16;
using PS_CPU_LEVEL::bits_to_float;
using PS_CPU_LEVEL::float_to_bits;
using PS_CPU_LEVEL::Half;
using PS_CPU_LEVEL::store;
using PS_CPU_LEVEL::to_float;

constexpr int kKeyBlock = 32;  // keys per block: two 16-float vectors of scores per query row
constexpr int kRowTile = 8;    // query rows per score tile (16 accumulators + 2 K vectors)
constexpr int kPvRows = 4;     // query rows per PV tile (4 rows x 4 vectors = 16 accumulators)
constexpr int kSumLanes = 16;  // softmax denominators are kept as 16 partial sums per row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
struct Problem {
  const T* q;            // [B, Hq, rows, D]
  const T* k_new;        // [B, Hkv, rows, D]
  const T* v_new;
  T* k_cache;            // [B, Hkv, S, D]
  T* v_cache;
  const int64_t* cache_lens;  // [B]
  T* out;                // [B, Hq, rows, D]
  float* lse;            // [B, Hq, rows]
  int64_t batch, q_heads, kv_heads, rows, head_dim, cache_rows;
  float scale;
  int64_t window;        // sliding window in positions, 0 = none
  float softcap;         // logit soft-cap (of the scaled scores), 0 = off
  const float* sinks;    // [Hq] sink logits, or null
};

// Per sequence: n compact rows (module comment), the first `written` of which are appended
// to the cache after the prefix; rows [split, split + skip) are padding (out 0, lse -inf).
struct SeqRows {
  int64_t n, split, skip, written;
  int64_t row(int64_t i) const { return i < split ? i : i + skip; }
};

// A mask policy: bits(b, i, j0) = the new keys j0 .. j0 + 31 compact query i may attend
// (bit c <=> key j0 + c); depth(b, i) = compact row i's position after the prefix.
struct CausalPolicy {
  uint32_t bits(int64_t /*b*/, int64_t i, int64_t j0) const {
    if (i < j0) return 0;
    const int64_t allowed = i - j0 + 1;
    return allowed >= 32 ? 0xffffffffu : (1u << allowed) - 1u;
  }
  int64_t depth(int64_t /*b*/, int64_t i) const { return i; }
};

struct TreeBitsPolicy {
  const int64_t* words;  // [B, N, W] contiguous
  int64_t nodes, words_per_row;
  // j0 is a multiple of 32 (blocks start at new key 0), so the 32 bits sit in one word
  uint32_t bits(int64_t b, int64_t i, int64_t j0) const {
    const uint64_t w = uint64_t(words[(b * nodes + i) * words_per_row + (j0 >> 6)]);
    return uint32_t(w >> (j0 & 63));
  }
  // an ancestor-or-self mask: the row's bits count the node's ancestors plus itself
  int64_t depth(int64_t b, int64_t i) const {
    const int64_t* row = words + (b * nodes + i) * words_per_row;
    int64_t count = 0;
    for (int64_t w = 0; w < words_per_row; ++w) count += __builtin_popcountll(uint64_t(row[w]));
    return count - 1;
  }
};

// The operands of the stages, in one of two formats. A key block is staged once, on first
// use, and serves every query tile of the work item.
//   fp32 (every level, every storage type): query rows pre-scaled by scale * log2(e), K
//     transposed to fp32, V rows as fp32 (the cache rows themselves for fp32 storage).
//   bf16 pairs (bf16 storage on the avx512_bf16 level): q and K stay bf16, as 32-bit pairs of
//     elements (2e, 2e + 1); vdpbf16ps multiplies pairs exactly and accumulates in fp32, and
//     the scale is applied to the scores. V as pairs of keys per column.
struct QRows { const float* q; int64_t d; };                        // q[r * d + e]
struct KCols { const float* kt; int64_t d; };                       // kt[e * 32 + c] = key c's element e
struct VRows { const float* const* rows; int kb; };                 // rows[c][e], c < kb
struct QPairs { const uint32_t* q; int64_t pairs; float scale; };   // q[r * pairs + e]; scale: of the scores
struct KPairs { const uint32_t* kt; int64_t pairs; };               // kt[e * 32 + c] = key c's pair e
struct VPairs { const uint32_t* vp; int kb; };                      // vp[c2 * dp + e] = (v_2c2[e], v_2c2+1[e])

// A growable scratch array of this level (not std::vector: its out-of-line members would be
// COMDAT code shared with other levels' copies, see simd.h). Contents are not kept on growth.
template <typename T>
struct Buffer {
  T* ptr = nullptr;
  int64_t capacity = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(ptr); }
  void resize(int64_t n) {
    if (n <= capacity) return;
    std::free(ptr);
    ptr = static_cast<T*>(std::malloc(sizeof(T) * size_t(n)));
    if (ptr == nullptr) std::abort();
    capacity = n;
  }
  T* data() { return ptr; }
  T& operator[](int64_t i) { return ptr[i]; }
};

// Scratch of one thread, reused across its work items.
struct Workspace {
  Buffer<float> q, o, m, l, kt, v, s, p, alpha;
  Buffer<uint32_t> q_pairs, kt_pairs, v_pairs;  // the bf16-pair operands
  Buffer<int64_t> depth, first;                 // window: each new key's depth, each query row's first prefix row
  const float* vrow[kKeyBlock];                 // the staged block's V rows (VRows)
  void reserve(int64_t rows, int64_t d, int64_t dp) {
    q.resize(rows * d);
    q_pairs.resize(rows * (d + 1) / 2);
    kt_pairs.resize((dp / 2) * kKeyBlock);
    v_pairs.resize((kKeyBlock / 2) * dp);
    o.resize(rows * dp);
    m.resize(rows);
    l.resize(rows * kSumLanes);
    kt.resize(dp * kKeyBlock);
    v.resize(kKeyBlock * dp);
    s.resize(kRowTile * kKeyBlock);
    p.resize(kRowTile * kKeyBlock);
    alpha.resize(kRowTile);
  }
};

}  // namespace ps_kernels::cpu::PS_CPU_LEVEL::attention
