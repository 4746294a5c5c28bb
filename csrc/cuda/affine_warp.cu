// Affine bilinear warp on CUDA, without a materialised sampling grid.
//
// Forward: one thread per output pixel computes its four taps once and loops over the
// channels (consecutive threads write consecutive pixels). Backward: the transpose, a
// scatter-add; each thread takes a run of output pixels along a row and sums the contributions
// to a tap in a register until the tap moves (upsampling: one atomic per run instead of one
// per pixel). When the input planes of one image fit in shared memory (heatmaps: 7 x 7), each
// block accumulates its share of output pixels into a shared-memory copy of that image's
// gradient, which spreads the heavy contention (thousands of output pixels per input pixel)
// over fast shared atomics, then adds it to global memory once per block. Larger inputs
// (images) scatter straight to global memory, where few outputs share an input pixel. The
// atomics make the backward non-deterministic: it alerts under torch.use_deterministic_algorithms.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../cgc.h"
#include "../warp_coords.h"
#include "utils.cuh"

namespace cgc {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 32 * 1024;

// Taps of output pixel (oy, ox) of image b: the two x taps, the two y taps.
template <typename coord_t>
struct PixelTaps {
  Taps<coord_t> x, y;
};

template <typename coord_t>
__device__ __forceinline__ PixelTaps<coord_t> pixel_taps(const coord_t* __restrict__ th, int64_t oy, int64_t ox,
                                                         int64_t h, int64_t w, int64_t H, int64_t W, bool border) {
  const coord_t xs = norm_centre<coord_t>(ox, w), ys = norm_centre<coord_t>(oy, h);
  PixelTaps<coord_t> t;
  t.x = taps(unnormalize(th[0] * xs + th[1] * ys + th[2], W, border), W);
  t.y = taps(unnormalize(th[3] * xs + th[4] * ys + th[5], H, border), H);
  return t;
}

// grid (ceil(h*w / threads), B): one thread per output pixel of image blockIdx.y. In-plane
// positions are 32-bit (planes are checked to be smaller than 2^31 pixels), plane offsets 64-bit.
template <typename scalar_t, typename coord_t>
__global__ void warp_fwd_kernel(const scalar_t* __restrict__ in, const coord_t* __restrict__ theta,
                                scalar_t* __restrict__ out, int64_t C, int H, int W, int h, int w, bool border) {
  using acc_t = at::opmath_type<scalar_t>;
  const int pix = blockIdx.x * blockDim.x + threadIdx.x;
  if (pix >= h * w) return;
  const int64_t b = blockIdx.y;
  const int oy = pix / w, ox = pix - oy * w;
  const PixelTaps<coord_t> t = pixel_taps(theta + 6 * b, oy, ox, h, w, H, W, border);
  const acc_t w00 = t.y.w0 * t.x.w0, w01 = t.y.w0 * t.x.w1, w10 = t.y.w1 * t.x.w0, w11 = t.y.w1 * t.x.w1;
  const int y0 = static_cast<int>(t.y.i0) * W, y1 = static_cast<int>(t.y.i1) * W;
  const int x0 = static_cast<int>(t.x.i0), x1 = static_cast<int>(t.x.i1);
  const int i00 = y0 + x0, i01 = y0 + x1, i10 = y1 + x0, i11 = y1 + x1;
  const int64_t in_plane = static_cast<int64_t>(H) * W, out_plane = static_cast<int64_t>(h) * w;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* src = in + (b * C + c) * in_plane;
    const acc_t v = static_cast<acc_t>(src[i00]) * w00 + static_cast<acc_t>(src[i01]) * w01 +
                    static_cast<acc_t>(src[i10]) * w10 + static_cast<acc_t>(src[i11]) * w11;
    out[(b * C + c) * out_plane + pix] = static_cast<scalar_t>(v);
  }
}

// One tap's pending contribution: consecutive output pixels of a row mostly share their taps,
// so contributions are summed in a register and added atomically only when the index changes.
template <typename acc_t>
struct Pending {
  int idx = -1;
  acc_t sum = 0;
  __device__ __forceinline__ void add(acc_t* dst, int i, acc_t v) {
    if (i != idx) {
      flush(dst);
      idx = i;
    }
    sum += v;
  }
  __device__ __forceinline__ void flush(acc_t* dst) {
    if (idx >= 0 && sum != acc_t(0)) atomicAdd(dst + idx, sum);
    sum = 0;
  }
};

constexpr int kRun = 8;  // output pixels of one row per thread in the backward

// Backward of a run of kRun output pixels (oy, ox0..) of one plane into `dst` (H x W).
template <typename scalar_t, typename coord_t, typename acc_t>
__device__ __forceinline__ void scatter_run(const scalar_t* __restrict__ go, const coord_t* __restrict__ th,
                                            acc_t* dst, int oy, int ox0, int H, int W, int h, int w, bool border) {
  Pending<acc_t> p00, p01, p10, p11;
  const int ox1 = min(w, ox0 + kRun);
  for (int ox = ox0; ox < ox1; ++ox) {
    const PixelTaps<coord_t> t = pixel_taps(th, oy, ox, h, w, H, W, border);
    const acc_t g = static_cast<acc_t>(go[oy * w + ox]);
    const int r0 = static_cast<int>(t.y.i0) * W, r1 = static_cast<int>(t.y.i1) * W;
    if (t.y.w0 != coord_t(0) && t.x.w0 != coord_t(0)) p00.add(dst, r0 + static_cast<int>(t.x.i0), g * (t.y.w0 * t.x.w0));
    if (t.y.w0 != coord_t(0) && t.x.w1 != coord_t(0)) p01.add(dst, r0 + static_cast<int>(t.x.i1), g * (t.y.w0 * t.x.w1));
    if (t.y.w1 != coord_t(0) && t.x.w0 != coord_t(0)) p10.add(dst, r1 + static_cast<int>(t.x.i0), g * (t.y.w1 * t.x.w0));
    if (t.y.w1 != coord_t(0) && t.x.w1 != coord_t(0)) p11.add(dst, r1 + static_cast<int>(t.x.i1), g * (t.y.w1 * t.x.w1));
  }
  p00.flush(dst);
  p01.flush(dst);
  p10.flush(dst);
  p11.flush(dst);
}

// grid (blocks per image, B): a shared-memory image gradient per block, runs strided over the grid.
template <typename scalar_t, typename coord_t, typename acc_t>
__global__ void warp_bwd_shared_kernel(const scalar_t* __restrict__ go, const coord_t* __restrict__ theta,
                                       acc_t* __restrict__ gin, int64_t C, int H, int W, int h, int w,
                                       bool border) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* acc = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t b = blockIdx.y;
  const int n = static_cast<int>(C) * H * W, runs_per_row = (w + kRun - 1) / kRun, runs = h * runs_per_row;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc[i] = acc_t(0);
  __syncthreads();
  for (int64_t c = 0; c < C; ++c)
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < runs; r += gridDim.x * blockDim.x)
      scatter_run(go + (b * C + c) * h * w, theta + 6 * b, acc + c * H * W, r / runs_per_row,
                  (r % runs_per_row) * kRun, H, W, h, w, border);
  __syncthreads();
  acc_t* dst = gin + b * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    if (acc[i] != acc_t(0)) atomicAdd(dst + i, acc[i]);
}

// grid (ceil(runs / threads), C, B): straight to global memory (large inputs, little contention).
template <typename scalar_t, typename coord_t, typename acc_t>
__global__ void warp_bwd_global_kernel(const scalar_t* __restrict__ go, const coord_t* __restrict__ theta,
                                       acc_t* __restrict__ gin, int64_t C, int H, int W, int h, int w,
                                       bool border) {
  const int runs_per_row = (w + kRun - 1) / kRun;
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= h * runs_per_row) return;
  const int64_t plane = static_cast<int64_t>(blockIdx.z) * C + blockIdx.y;
  scatter_run(go + plane * h * w, theta + 6 * static_cast<int64_t>(blockIdx.z), gin + plane * H * W,
              r / runs_per_row, (r % runs_per_row) * kRun, H, W, h, w, border);
}

// Planes are indexed with 32-bit positions, batches and channels go into grid dimensions.
void check_cuda_sizes(int64_t B, int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, const char* op) {
  TORCH_CHECK(B <= 65535 && C <= 65535, op, ": CUDA kernels take at most 65535 images and channels, got ", B,
              " and ", C);
  TORCH_CHECK(H * W < (int64_t(1) << 31) && h * w < (int64_t(1) << 31) && C * H * W < (int64_t(1) << 31), op,
              ": planes must have fewer than 2^31 elements");
}

at::Tensor affine_warp_fwd_cuda(const at::Tensor& input, const at::Tensor& theta, int64_t out_h, int64_t out_w,
                                int64_t padding_mode) {
  check_warp(input, theta, out_h, out_w, padding_mode, "affine_warp_fwd");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  check_cuda_sizes(B, C, H, W, out_h, out_w, "affine_warp_fwd");
  at::Tensor out = at::empty({B, C, out_h, out_w}, x.options());
  const auto coord = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor th = theta.to(coord).contiguous();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_warp_fwd_cuda", [&] {
    using coord_t = at::opmath_type<scalar_t>;
    const dim3 grid(ceil_div(out_h * out_w, kThreads), B);
    warp_fwd_kernel<scalar_t, coord_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), th.const_data_ptr<coord_t>(), out.data_ptr<scalar_t>(), C, H, W, out_h, out_w,
        padding_mode == kPadBorder);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor affine_warp_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& theta, int64_t in_h, int64_t in_w,
                                int64_t padding_mode) {
  check_warp(grad_out, theta, in_h, in_w, padding_mode, "affine_warp_bwd");
  // the scatter-add's atomics make the last bits depend on the order the blocks run in
  at::globalContext().alertNotDeterministic(
      "cgc::affine_warp_bwd on CUDA (cgc.ops picks backend='reference' under backend='auto')");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor go = grad_out.contiguous();
  const int64_t B = go.size(0), C = go.size(1), h = go.size(2), w = go.size(3);
  check_cuda_sizes(B, C, in_h, in_w, h, w, "affine_warp_bwd");
  const auto acc = go.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor th = theta.to(acc).contiguous();
  // float32 accumulation for every non-double dtype (atomics on half/bf16 lose too much)
  at::Tensor gin = at::zeros({B, C, in_h, in_w}, go.options().dtype(acc));
  const bool border = padding_mode == kPadBorder;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "affine_warp_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t plane_bytes = C * in_h * in_w * static_cast<int64_t>(sizeof(acc_t));
    const int64_t runs = h * ceil_div(w, kRun);
    if (plane_bytes <= kSharedBytes) {
      // enough blocks per image to fill the GPU, each thread with a few runs
      const int64_t per_image = std::max<int64_t>(1, std::min(ceil_div(runs, 4 * kThreads), ceil_div(target_blocks(), B)));
      const dim3 grid(per_image, B);
      warp_bwd_shared_kernel<scalar_t, acc_t, acc_t><<<grid, kThreads, plane_bytes, stream>>>(
          go.const_data_ptr<scalar_t>(), th.const_data_ptr<acc_t>(), gin.data_ptr<acc_t>(), C, in_h, in_w, h, w,
          border);
    } else {
      const dim3 grid(ceil_div(runs, kThreads), C, B);
      warp_bwd_global_kernel<scalar_t, acc_t, acc_t><<<grid, kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), th.const_data_ptr<acc_t>(), gin.data_ptr<acc_t>(), C, in_h, in_w, h, w,
          border);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gin.scalar_type() == go.scalar_type() ? gin : gin.to(go.scalar_type());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(cgc, CUDA, m) {
  m.impl("affine_warp_fwd", &cuda::affine_warp_fwd_cuda);
  m.impl("affine_warp_bwd", &cuda::affine_warp_bwd_cuda);
}

}  // namespace cgc
