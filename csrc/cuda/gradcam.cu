// Grad-CAM on CUDA.
//
// Forward: the channel sum is a column reduction of each map's [K, HW] matrix. Blocks of
// 32 x 8 threads read 32 consecutive pixels (coalesced) of 8 channels at a time, over a chunk
// of channels; chunks are split so that the grid fills the GPU, and their partial sums are
// added (with the ReLU) by a second small kernel. Pooled weights (spatial means of the
// gradients) are computed first by a row-reduction kernel.
// Backward: one warp (or block, for large maps) per channel row computes the row's weight and
// sum(mask * grad_out * A) and writes both gradients, the ReLU mask read off the forward output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../cgc.h"
#include "utils.cuh"

namespace cgc {
namespace cuda {
namespace {

constexpr int kColX = 32, kColY = 8;

// Mean over each row of HW gradients: one warp per row.
template <typename scalar_t, typename acc_t>
__global__ void row_mean_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ w, int64_t rows, int64_t HW) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= rows) return;  // whole warps leave together (rows are warp-aligned)
  acc_t s = 0;
  for (int64_t i = lane; i < HW; i += kWarp) s += static_cast<acc_t>(g[r * HW + i]);
  s = warp_sum(s);
  if (lane == 0) w[r] = s / static_cast<acc_t>(HW);
}

// Partial (or, with one chunk, final) channel sums: grid (ceil(HW/32), chunks, B).
template <typename scalar_t, typename acc_t>
__global__ void gradcam_fwd_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ G,
                                   const acc_t* __restrict__ weights, acc_t* __restrict__ partial,
                                   scalar_t* __restrict__ out, int64_t K, int64_t HW, int64_t k_chunk) {
  __shared__ acc_t tile[kColY][kColX + 1];
  const int64_t b = blockIdx.z, chunk = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kColX + threadIdx.x;
  const int64_t k0 = chunk * k_chunk, k1 = min(K, k0 + k_chunk);
  acc_t acc = 0;
  if (i < HW) {
    for (int64_t k = k0 + threadIdx.y; k < k1; k += kColY) {
      const int64_t idx = (b * K + k) * HW + i;
      const acc_t w = weights != nullptr ? weights[b * K + k] : static_cast<acc_t>(G[idx]);
      acc += w * static_cast<acc_t>(A[idx]);
    }
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && i < HW) {
    acc_t s = 0;
#pragma unroll
    for (int y = 0; y < kColY; ++y) s += tile[y][threadIdx.x];
    if (partial != nullptr) {
      partial[(b * gridDim.y + chunk) * HW + i] = s;
    } else {
      out[b * HW + i] = static_cast<scalar_t>(s > acc_t(0) ? s : acc_t(0));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gradcam_finish_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out, int64_t B,
                                      int64_t chunks, int64_t HW) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= B * HW) return;
  const int64_t b = j / HW, i = j % HW;
  acc_t s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[(b * chunks + c) * HW + i];
  out[j] = static_cast<scalar_t>(s > acc_t(0) ? s : acc_t(0));
}

// kMode 0: element-wise gradients; 1: pooled 4-D gradients; 2: [B,K] weights.
// TPR threads per row: a warp, or the whole block for large maps.
template <typename scalar_t, typename acc_t, int kMode, int TPR>
__global__ void gradcam_bwd_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
                                   const scalar_t* __restrict__ A, const scalar_t* __restrict__ G,
                                   scalar_t* __restrict__ dA, scalar_t* __restrict__ dG, int64_t rows, int64_t K,
                                   int64_t HW) {
  __shared__ acc_t scratch[kWarp];
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / TPR;
  const int t = threadIdx.x % TPR;
  if (TPR == kWarp && r >= rows) return;  // a block-wide row never goes past `rows`
  const int64_t base = r * HW, map = (r / K) * HW;
  if (kMode == 0) {
    for (int64_t i = t; i < HW; i += TPR) {
      const acc_t m = static_cast<acc_t>(out[map + i]) > acc_t(0) ? static_cast<acc_t>(go[map + i]) : acc_t(0);
      dA[base + i] = static_cast<scalar_t>(m * static_cast<acc_t>(G[base + i]));
      dG[base + i] = static_cast<scalar_t>(m * static_cast<acc_t>(A[base + i]));
    }
    return;
  }
  acc_t w = 0, s = 0;
  for (int64_t i = t; i < HW; i += TPR) {
    const acc_t m = static_cast<acc_t>(out[map + i]) > acc_t(0) ? static_cast<acc_t>(go[map + i]) : acc_t(0);
    s += m * static_cast<acc_t>(A[base + i]);
    if (kMode == 1) w += static_cast<acc_t>(G[base + i]);
  }
  if (TPR == kWarp) {
    s = __shfl_sync(0xffffffffu, warp_sum(s), 0);
    if (kMode == 1) w = __shfl_sync(0xffffffffu, warp_sum(w), 0);
  } else {
    s = block_reduce(s, scratch);
    if (kMode == 1) w = block_reduce(w, scratch);
  }
  w = kMode == 1 ? w / static_cast<acc_t>(HW) : static_cast<acc_t>(G[r]);
  for (int64_t i = t; i < HW; i += TPR) {
    const acc_t m = static_cast<acc_t>(out[map + i]) > acc_t(0) ? static_cast<acc_t>(go[map + i]) : acc_t(0);
    dA[base + i] = static_cast<scalar_t>(m * w);
    if (kMode == 1) dG[base + i] = static_cast<scalar_t>(s / static_cast<acc_t>(HW));
  }
  if (kMode == 2 && t == 0) dG[r] = static_cast<scalar_t>(s);
}

at::Tensor gradcam_fwd_cuda(const at::Tensor& activations, const at::Tensor& gradients, bool pool) {
  check_gradcam(activations, gradients, "gradcam_fwd");
  const c10::cuda::CUDAGuard guard(activations.device());
  const at::Tensor A = activations.contiguous();
  const at::Tensor G = gradients.contiguous();
  const int64_t B = A.size(0), K = A.size(1), HW = A.size(2) * A.size(3);
  at::Tensor out = at::empty({B, A.size(2), A.size(3)}, A.options());
  const bool elementwise = G.dim() == 4 && !pool;
  const auto acc = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const cudaStream_t stream = current_stream();
  // chunks of channels so that the grid has enough blocks; at least 32 channels per chunk
  const int64_t col_blocks = ceil_div(HW, kColX);
  TORCH_CHECK(B <= 65535, "gradcam_fwd: CUDA batches are limited to 65535 maps, got ", B);
  const int64_t chunks = std::max<int64_t>(
      1, std::min({ceil_div(K, 32), target_blocks() / (col_blocks * B), int64_t(65535)}));
  const int64_t k_chunk = ceil_div(K, chunks);
  at::Tensor weights, partial;
  if (!elementwise)
    weights = G.dim() == 2 ? G.to(acc).contiguous() : at::empty({B, K}, A.options().dtype(acc));
  if (chunks > 1) partial = at::empty({B, chunks, HW}, A.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!elementwise && G.dim() == 4) {
      const int64_t rows = B * K;
      row_mean_kernel<scalar_t, acc_t><<<ceil_div(rows * kWarp, 256), 256, 0, stream>>>(
          G.const_data_ptr<scalar_t>(), weights.data_ptr<acc_t>(), rows, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const dim3 grid(col_blocks, chunks, B), block(kColX, kColY);
    gradcam_fwd_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        A.const_data_ptr<scalar_t>(), elementwise ? G.const_data_ptr<scalar_t>() : nullptr,
        elementwise ? nullptr : weights.const_data_ptr<acc_t>(), chunks > 1 ? partial.data_ptr<acc_t>() : nullptr,
        out.data_ptr<scalar_t>(), K, HW, k_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (chunks > 1) {
      gradcam_finish_kernel<scalar_t, acc_t><<<ceil_div(B * HW, 256), 256, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, chunks, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

template <typename scalar_t, int kMode>
void launch_bwd(const at::Tensor& go, const at::Tensor& out, const at::Tensor& A, const at::Tensor& G,
                at::Tensor& dA, at::Tensor& dG, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = A.size(0) * A.size(1), K = A.size(1), HW = A.size(2) * A.size(3);
  const auto args = std::make_tuple(go.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                    A.const_data_ptr<scalar_t>(), G.const_data_ptr<scalar_t>(),
                                    dA.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>());
  if (HW >= 2048) {  // a block per row
    gradcam_bwd_kernel<scalar_t, acc_t, kMode, 256><<<rows, 256, 0, stream>>>(
        std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args), std::get<4>(args),
        std::get<5>(args), rows, K, HW);
  } else {  // a warp per row, 8 rows per block
    gradcam_bwd_kernel<scalar_t, acc_t, kMode, kWarp><<<ceil_div(rows * kWarp, 256), 256, 0, stream>>>(
        std::get<0>(args), std::get<1>(args), std::get<2>(args), std::get<3>(args), std::get<4>(args),
        std::get<5>(args), rows, K, HW);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> gradcam_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                                    const at::Tensor& activations, const at::Tensor& gradients,
                                                    bool pool) {
  check_gradcam(activations, gradients, "gradcam_bwd");
  check_gradcam_map(grad_out, activations, "gradcam_bwd", "grad_out");
  check_gradcam_map(out, activations, "gradcam_bwd", "out");
  const c10::cuda::CUDAGuard guard(activations.device());
  const at::Tensor A = activations.contiguous(), G = gradients.contiguous();
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  at::Tensor dA = at::empty_like(A), dG = at::empty_like(G);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_bwd_cuda", [&] {
    if (G.dim() == 2)
      launch_bwd<scalar_t, 2>(go, o, A, G, dA, dG, stream);
    else if (pool)
      launch_bwd<scalar_t, 1>(go, o, A, G, dA, dG, stream);
    else
      launch_bwd<scalar_t, 0>(go, o, A, G, dA, dG, stream);
  });
  return {dA, dG};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(cgc, CUDA, m) {
  m.impl("gradcam_fwd", &cuda::gradcam_fwd_cuda);
  m.impl("gradcam_bwd", &cuda::gradcam_bwd_cuda);
}

}  // namespace cgc
