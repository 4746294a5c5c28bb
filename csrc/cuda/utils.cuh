// Small helpers shared by the CUDA kernels: launch sizes, reductions within a warp and within
// a block. Only c10/cuda headers are used (ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit may lack).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace cgc {
namespace cuda {

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of blocks that keeps every SM busy a few times over.
inline int64_t target_blocks() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return 4 * static_cast<int64_t>(sms);
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or max) over a 1-D block of blockDim.x threads (a multiple of 32, at most 1024); the
// result is returned to every thread. `scratch` holds 32 values.
template <typename T, bool kMax = false>
__device__ T block_reduce(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T x = lane < warps ? scratch[lane] : (kMax ? scratch[0] : T(0));
    x = kMax ? warp_max(x) : warp_sum(x);
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  return scratch[0];
}

}  // namespace cuda
}  // namespace cgc
