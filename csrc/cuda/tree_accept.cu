#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "tree_accept.cuh"

namespace ps_kernels::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kScanItems = 8;  // consecutive elements per thread in the inverse-CDF scan
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
template <typename T>
__device__ __forceinline__ double to_double(T x) { return static_cast<double>(to_float(x)); }

// An int with the order of the float's values (-0 ties +0), so the argmax is exact whatever
// --use_fast_math does to float comparisons of denormals.
__device__ __forceinline__ int order_key(float x) {
  int bits = __float_as_int(x);
  if (bits == INT_MIN) bits = 0;
  return bits >= 0 ? bits : bits ^ 0x7fffffff;
}

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Min {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

struct ReduceSmem {
  double d[kWarps];
  int key[kWarps];
  int arg[kWarps];
};

// Every decision of the walk is taken by all threads at once, so every block-wide result must be
// bitwise the same in all threads: the butterfly gives each lane the same warp result (the ops
// commute), and every thread then folds the warps' partials in the same order.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* smem) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  __syncthreads();
  return r;
}

// The first index of the maximum (torch.argmax's rule): each thread keeps its first maximum,
// and merging keeps the larger value, on ties the smaller index.
template <typename T>
__device__ int block_argmax(const T* row, int V, ReduceSmem& red) {
  int best = INT_MIN, arg = V;
#pragma unroll 4
  for (int v = threadIdx.x; v < V; v += kThreads) {
    const int k = order_key(to_float(row[v]));
    if (k > best) {
      best = k;
      arg = v;
    }
  }
  auto merge = [](int& best, int& arg, int ob, int oa) {
    if (ob > best || (ob == best && oa < arg)) {
      best = ob;
      arg = oa;
    }
  };
  for (int o = 16; o > 0; o >>= 1) {
    const int ob = __shfl_xor_sync(kFullMask, best, o), oa = __shfl_xor_sync(kFullMask, arg, o);
    merge(best, arg, ob, oa);
  }
  if (threadIdx.x % 32 == 0) {
    red.key[threadIdx.x / 32] = best;
    red.arg[threadIdx.x / 32] = arg;
  }
  __syncthreads();
  best = red.key[0];
  arg = red.arg[0];
  for (int w = 1; w < kWarps; ++w) merge(best, arg, red.key[w], red.arg[w]);
  __syncthreads();
  return arg;
}

template <typename W>
__device__ double block_row_sum(const W* x, int V, ReduceSmem& red) {
  double local = 0.0;
  for (int v = threadIdx.x; v < V; v += kThreads) local += to_double(x[v]);
  return block_reduce(local, Sum{}, red.d);
}

// Exclusive prefix sum of one value per thread (in thread order) and the block's total.
__device__ double block_exclusive_scan(double v, double& block_total, ReduceSmem& red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double other = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += other;
  }
  double excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) excl = 0.0;
  if (lane == 31) red.d[warp] = incl;
  __syncthreads();
  double before = 0.0, total = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    if (w == warp) before = total;
    total += red.d[w];
  }
  __syncthreads();
  block_total = total;
  return before + excl;
}

// The smallest v with cdf[v] > u * sum(w) and w[v] > 0 (exact arithmetic never picks a zero
// weight; the guard keeps rounding from doing so); none: the last positive weight, else V - 1
// (the reference's clamp). Tiles of kThreads * kScanItems elements, each thread scanning
// kScanItems consecutive ones, stop at the first tile holding the draw.
template <typename W>
__device__ int inverse_cdf(const W* w, int V, double u, ReduceSmem& red) {
  double local = 0.0;
  int last = -1;
  for (int v = threadIdx.x; v < V; v += kThreads) {
    const double x = to_double(w[v]);
    local += x;
    if (x > 0.0) last = v;
  }
  const double threshold = u * block_reduce(local, Sum{}, red.d);
  const int last_positive = block_reduce(last, Max{}, red.arg);
  double prefix = 0.0;
  for (int tile = 0; tile < V; tile += kThreads * kScanItems) {
    const int first = tile + static_cast<int>(threadIdx.x) * kScanItems;
    double x[kScanItems];
    double run = 0.0;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      x[i] = first + i < V ? to_double(w[first + i]) : 0.0;
      run += x[i];
    }
    double tile_total;
    double cdf = prefix + block_exclusive_scan(run, tile_total, red);
    int hit = INT_MAX;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      cdf += x[i];
      if (hit == INT_MAX && x[i] > 0.0 && cdf > threshold) hit = first + i;
    }
    const int found = block_reduce(hit, Min{}, red.arg);
    if (found != INT_MAX) return found;
    prefix += tile_total;
  }
  return last_positive >= 0 ? last_positive : V - 1;
}

// Recursive rejection at node `cur` (see the reference). The residual r lives in `resid` from the
// first rejection at the node on; before that it is the target row. Returns the accepted child,
// or -1 with the drawn next token in `token`.
template <typename T, bool kDraft>
__device__ int sample_step(const TreeAcceptParams& p, int64_t b, const T* row, int cur, const int* first_child,
                           const int* next_sibling, double* resid, ReduceSmem& red, int64_t& token) {
  const int V = p.vocab;
  const int64_t* tokens = p.tokens + b * p.nodes;
  const double* u = p.uniforms + b * p.nodes;
  double total = 0.0;
  bool have_total = false, have_resid = false;
  for (int c = first_child[cur]; c >= 0; c = next_sibling[c]) {
    if (!have_total) {
      total = block_row_sum(row, V, red);
      have_total = true;
    }
    if (!(total > 0.0)) break;
    const int64_t t = tokens[c];
    const bool in_vocab = t >= 0 && t < V;  // out of range (unvalidated input): probability 0
    const double pt = !in_vocab ? 0.0 : have_resid ? resid[t] : to_double(row[t]);
    const T* q = kDraft ? static_cast<const T*>(p.draft_probs) + b * p.draft_stride_b + c * p.draft_stride_n : nullptr;
    double ratio;
    if constexpr (kDraft) {
      const double qt = in_vocab ? to_double(q[t]) : 0.0;
      ratio = fmin(1.0, (pt / total) / fmax(qt, 1e-30));
    } else {
      ratio = pt / total;
    }
    if (u[c] < ratio) return c;
    __syncthreads();  // every thread has read resid[t] before the residual changes
    if constexpr (kDraft) {
      double local = 0.0;
      for (int v = threadIdx.x; v < V; v += kThreads) {
        const double w = have_resid ? resid[v] : to_double(row[v]);
        const double r = fmax(w / total - to_double(q[v]), 0.0);
        resid[v] = r;
        local += r;
      }
      total = block_reduce(local, Sum{}, red.d);  // its barrier also publishes resid
      have_resid = true;
    } else if (pt > 0.0) {  // r[t] <- 0; a duplicated sibling token finds it zero already
      if (!have_resid) {
        for (int v = threadIdx.x; v < V; v += kThreads) resid[v] = to_double(row[v]);
      }
      __syncthreads();
      if (threadIdx.x == 0) resid[t] = 0.0;
      __syncthreads();
      total = block_row_sum(resid, V, red);
      have_resid = true;
    }
  }
  token = have_resid ? inverse_cdf(resid, V, u[0], red) : inverse_cdf(row, V, u[0], red);
  return -1;
}

// One CTA per sequence; all threads walk the tree together (every decision is block-uniform),
// cooperating on the V-wide work at the current node; thread 0 writes the path.
template <typename T, bool kSample, bool kDraft>
__global__ void __launch_bounds__(kThreads) tree_accept_kernel(const TreeAcceptParams p) {
  __shared__ int first_child[kTreeAcceptMaxNodes];
  __shared__ int next_sibling[kTreeAcceptMaxNodes];
  __shared__ ReduceSmem red;
  const int64_t b = blockIdx.x;
  const int N = p.nodes;
  const int64_t* parents = p.parents + b * p.parents_stride;
  const int64_t* tokens = p.tokens + b * N;
  int64_t* path = p.accept_index + b * N;
  for (int i = threadIdx.x; i < N; i += kThreads) first_child[i] = -1;
  __syncthreads();
  if (threadIdx.x == 0) {
    // Pushing the nodes, last first, onto their parent's list leaves every list in index order.
    // A node whose parent is out of range (unvalidated input) is unreachable.
    for (int c = N - 1; c >= 1; --c) {
      const int64_t par = parents[c];
      if (par >= 0 && par < c) {
        next_sibling[c] = first_child[par];
        first_child[par] = c;
      }
    }
    path[0] = 0;
  }
  __syncthreads();
  const T* target = static_cast<const T*>(p.target) + b * p.target_stride_b;
  int cur = 0, len = 1;
  int64_t token = 0;
  for (;;) {
    const T* row = target + cur * p.target_stride_n;
    int next = -1;
    if constexpr (kSample) {
      next = sample_step<T, kDraft>(p, b, row, cur, first_child, next_sibling, p.scratch + b * p.vocab, red, token);
    } else {
      token = block_argmax(row, p.vocab, red);
      for (int c = first_child[cur]; c >= 0; c = next_sibling[c]) {
        if (tokens[c] == token) {
          next = c;
          break;
        }
      }
    }
    if (next < 0) break;
    if (threadIdx.x == 0) path[len] = next;
    ++len;
    cur = next;  // children have larger indices: the walk ends
  }
  for (int i = len + static_cast<int>(threadIdx.x); i < N; i += kThreads) path[i] = -1;
  if (threadIdx.x == 0) {
    p.accept_lens[b] = len;
    p.next_token[b] = token;
  }
}

template <typename T>
cudaError_t launch_typed(const TreeAcceptParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.batch)), block(kThreads);
  if (p.uniforms == nullptr) tree_accept_kernel<T, false, false><<<grid, block, 0, stream>>>(p);
  else if (p.draft_probs == nullptr) tree_accept_kernel<T, true, false><<<grid, block, 0, stream>>>(p);
  else tree_accept_kernel<T, true, true><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tree_accept(const TreeAcceptParams& p, TreeAcceptDtype dtype, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.nodes < 1 || p.nodes > kTreeAcceptMaxNodes || p.vocab < 1) return cudaErrorInvalidValue;
  switch (dtype) {
    case TreeAcceptDtype::kFloat32: return launch_typed<float>(p, stream);
    case TreeAcceptDtype::kFloat16: return launch_typed<__half>(p, stream);
    case TreeAcceptDtype::kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ps_kernels::cuda
