// tree_accept, CPU kernel: framework-free (raw pointers, strides). The torch binding is
// tree_accept.cpp; the specification is ps_kernels/reference/tree_accept.py. T is the element
// type of target/draft_probs: float, or any 16-bit float type with a conversion to float.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ps_kernels::cpu {

template <typename T>
struct TreeAcceptArgs {
  const int64_t* tokens;       // [B, N] contiguous
  const int64_t* parents;      // row b at parents + b * parents_stride
  int64_t parents_stride;      // N, or 0 when the batch shares one tree
  const T* target;             // [B, N, V], unit stride over V
  int64_t target_stride_b, target_stride_n;
  const T* draft_probs;        // [B, N, V] like target, or nullptr (deterministic candidates)
  int64_t draft_stride_b, draft_stride_n;
  const double* uniforms;      // [B, N] contiguous; nullptr selects greedy mode
  double* scratch;             // [B, V] residual distributions (sample mode)
  int64_t batch, nodes, vocab;
  int64_t* accept_index;       // [B, N] out, contiguous
  int64_t* accept_lens;        // [B] out
  int64_t* next_token;         // [B] out
};

// GCC/Clang vector extensions: one 16-float vector is one AVX-512 register (two AVX2 ones).
typedef float F32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

template <typename T>
inline void load16(const T* x, F32x16& v) {
  for (int j = 0; j < 16; ++j) v[j] = static_cast<float>(x[j]);
}
inline void load16(const float* x, F32x16& v) { std::memcpy(&v, x, sizeof v); }

// First index of the maximum (torch.argmax's tie rule). kAcc independent vector accumulators
// each keep a running maximum per lane and the first index reaching it (independent chains
// hide the compare/blend latency); merging takes the smallest index among equal maxima.
template <typename T>
int64_t row_argmax(const T* x, int64_t n) {
  constexpr int kW = 16, kAcc = 4;
  float best = static_cast<float>(x[0]);
  int64_t arg = 0;
  const int64_t body = n / (kW * kAcc) * (kW * kAcc);
  if (body > 0) {
    const I32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    F32x16 lane_max[kAcc];
    I32x16 lane_arg[kAcc];
    for (int a = 0; a < kAcc; ++a) {
      load16(x + a * kW, lane_max[a]);
      lane_arg[a] = lane + a * kW;
    }
    for (int64_t i = kW * kAcc; i < body; i += kW * kAcc) {
      for (int a = 0; a < kAcc; ++a) {
        F32x16 v;
        load16(x + i + a * kW, v);
        const I32x16 gt = v > lane_max[a];
        lane_max[a] = gt ? v : lane_max[a];
        lane_arg[a] = gt ? lane + static_cast<int32_t>(i + a * kW) : lane_arg[a];
      }
    }
    for (int a = 0; a < kAcc; ++a) {
      for (int j = 0; j < kW; ++j) {
        if (lane_max[a][j] > best || (lane_max[a][j] == best && lane_arg[a][j] < arg)) {
          best = lane_max[a][j];
          arg = lane_arg[a][j];
        }
      }
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > best) {
      best = v;
      arg = i;
    }
  }
  return arg;
}

template <typename W>
double row_sum(const W* x, int64_t n) {
  constexpr int64_t kLanes = 8;
  double acc[kLanes] = {};
  const int64_t body = n / kLanes * kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(x[i + j]);
  double total = 0.0;
  for (int64_t i = body; i < n; ++i) total += static_cast<double>(x[i]);
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// The smallest v with cumsum(w)[v] > u * sum(w), both sums sequential in float64 exactly as
// torch.cumsum computes them. In exact arithmetic that v has w[v] > 0; the guard keeps rounding
// from ever choosing a zero-probability token. None found (all weights zero): the last positive
// weight, else n - 1 (the reference's clamp).
template <typename W>
int64_t sample_inverse_cdf(const W* w, int64_t n, double u) {
  double total = 0.0;
  int64_t last_positive = n - 1;
  for (int64_t v = 0; v < n; ++v) {
    const double x = static_cast<double>(w[v]);
    total += x;
    if (x > 0.0) last_positive = v;
  }
  const double threshold = u * total;
  double cdf = 0.0;
  for (int64_t v = 0; v < n; ++v) {
    const double x = static_cast<double>(w[v]);
    cdf += x;
    if (cdf > threshold && x > 0.0) return v;
  }
  return last_positive;
}

// resid = max(0, src / total - q) (src may be resid itself); returns sum(resid).
template <typename W, typename T>
double residual_update(const W* src, const T* q, double total, double* resid, int64_t n) {
  for (int64_t v = 0; v < n; ++v)
    resid[v] = std::max(0.0, static_cast<double>(src[v]) / total - static_cast<double>(q[v]));
  return row_sum(resid, n);
}

template <typename T>
int64_t greedy_walk(const TreeAcceptArgs<T>& a, int64_t b, int64_t* path, int64_t& len) {
  const int64_t* tok = a.tokens + b * a.nodes;
  const int64_t* par = a.parents + b * a.parents_stride;
  int64_t cur = 0;
  for (;;) {
    const int64_t want = row_argmax(a.target + b * a.target_stride_b + cur * a.target_stride_n, a.vocab);
    // Children have larger indices than their parent (topological order); the first match wins.
    // cur strictly increases, so the walk ends even on a malformed tree.
    int64_t next = -1;
    for (int64_t c = cur + 1; c < a.nodes; ++c) {
      if (par[c] == cur && tok[c] == want) {
        next = c;
        break;
      }
    }
    if (next < 0) return want;
    path[len++] = cur = next;
  }
}

// Recursive rejection at each node on the path (see the reference's docstring). The residual r
// lives in `resid` from the first rejection at a node on; before that it is the target row.
template <typename T>
int64_t sample_walk(const TreeAcceptArgs<T>& a, int64_t b, int64_t* path, int64_t& len) {
  const int64_t N = a.nodes, V = a.vocab;
  const int64_t* tok = a.tokens + b * N;
  const int64_t* par = a.parents + b * a.parents_stride;
  const double* u = a.uniforms + b * N;
  double* resid = a.scratch + b * V;
  int64_t cur = 0;
  for (;;) {
    const T* row = a.target + b * a.target_stride_b + cur * a.target_stride_n;
    bool have_resid = false;
    bool have_total = false;
    double total = 0.0;
    int64_t accepted = -1;
    for (int64_t c = cur + 1; c < N; ++c) {
      if (par[c] != cur) continue;
      if (!have_total) {
        total = row_sum(row, V);
        have_total = true;
      }
      if (!(total > 0.0)) break;
      const int64_t t = tok[c];
      const bool in_vocab = t >= 0 && t < V;  // out of range (unvalidated input): probability 0
      const double p = in_vocab ? (have_resid ? resid[t] : static_cast<double>(row[t])) : 0.0;
      const T* q = a.draft_probs ? a.draft_probs + b * a.draft_stride_b + c * a.draft_stride_n : nullptr;
      double ratio;
      if (q == nullptr) {
        ratio = p / total;
      } else {
        const double qt = in_vocab ? static_cast<double>(q[t]) : 0.0;
        ratio = std::min(1.0, (p / total) / std::max(qt, 1e-30));
      }
      if (u[c] < ratio) {
        accepted = c;
        break;
      }
      if (q != nullptr) {
        total = have_resid ? residual_update(resid, q, total, resid, V) : residual_update(row, q, total, resid, V);
        have_resid = true;
      } else if (p > 0.0) {  // r[t] = 0; a duplicated sibling token finds it zero already
        if (!have_resid) std::copy(row, row + V, resid);
        have_resid = true;
        resid[t] = 0.0;
        total = row_sum(resid, V);
      }
    }
    if (accepted < 0) return have_resid ? sample_inverse_cdf(resid, V, u[0]) : sample_inverse_cdf(row, V, u[0]);
    path[len++] = cur = accepted;
  }
}

// One sequence: its path (root first, -1 after), its length and its next token.
template <typename T>
void tree_accept_sequence(const TreeAcceptArgs<T>& a, int64_t b) {
  int64_t* path = a.accept_index + b * a.nodes;
  int64_t len = 0;
  path[len++] = 0;
  const int64_t next = a.uniforms ? sample_walk(a, b, path, len) : greedy_walk(a, b, path, len);
  std::fill(path + len, path + a.nodes, int64_t{-1});
  a.accept_lens[b] = len;
  a.next_token[b] = next;
}

}  // namespace ps_kernels::cpu
