// Shared helpers for the framework-free CUDA kernels: nvcc alone compiles these headers.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#if defined(__CUDACC__)
#define PS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PS_HOST_DEVICE inline
#endif

namespace ps_kernels::cuda {

PS_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ps_kernels::cuda
