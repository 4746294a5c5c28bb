// InfoNCE on CUDA. Forward: one pass over anchors and positives for norms and positive dots
// (row chunks reduced in double, partial sums per chunk), the Gram of the raw anchors by
// cuBLAS, and one block per row for the logits and log-sum-exp. Backward: one block per row
// for the B x B coefficients (double), one cuBLAS matmul, and two passes over the rows that
// add the positive term, write d positives and project out the normalization (see
// cpu/info_nce.cpp for the formulas and cgc.h for why the coefficients are in double). The
// explicit-negatives form mirrors the CPU algorithm with the same kernels on a b x N Gram, plus a
// row pass for the negatives' norms and two for their gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cfloat>

#include "../cgc.h"
#include "utils.cuh"

namespace cgc {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // elements of a row per block in the row passes

// partial[b, chunk, 0..2] = sums of a^2, p^2, a.p over one chunk of row b.
template <typename scalar_t>
__global__ void nce_stats_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                 double* __restrict__ partial, int64_t D) {
  __shared__ double scratch[kWarp];
  const int64_t b = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t c1 = min(D, c0 + kChunk);
  double aa = 0, pp = 0, ap = 0;
  for (int64_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
    const double x = static_cast<double>(a[b * D + i]), y = static_cast<double>(p[b * D + i]);
    aa += x * x;
    pp += y * y;
    ap += x * y;
  }
  aa = block_reduce(aa, scratch);
  pp = block_reduce(pp, scratch);
  ap = block_reduce(ap, scratch);
  if (threadIdx.x == 0) {
    double* o = partial + (b * gridDim.x + blockIdx.x) * 3;
    o[0] = aa, o[1] = pp, o[2] = ap;
  }
}

// Norms and positive dots from the chunk sums: stats[0..1, b], dots[b].
__global__ void nce_norms_kernel(const double* __restrict__ partial, double* __restrict__ stats,
                                 double* __restrict__ dots, int64_t B, int64_t chunks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  double aa = 0, pp = 0, ap = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const double* s = partial + (b * chunks + c) * 3;
    aa += s[0], pp += s[1], ap += s[2];
  }
  stats[b] = sqrt(aa);
  stats[B + b] = sqrt(pp);
  dots[b] = ap;
}

// One block per row: logits (diagonal = positive), log-sum-exp and the row's loss.
__global__ void nce_logits_kernel(const double* __restrict__ gram, const double* __restrict__ dots,
                                  double* __restrict__ stats, double* __restrict__ logits,
                                  double* __restrict__ loss, int64_t B, double inv_t) {
  __shared__ double scratch[kWarp];
  const int64_t b = blockIdx.x;
  const double iab = 1.0 / max(stats[b], kEpsNorm);
  double* l = logits + b * B;
  double mx = -DBL_MAX;
  for (int64_t k = threadIdx.x; k < B; k += blockDim.x) {
    const double v = k == b ? dots[b] * iab / max(stats[B + b], kEpsNorm) * inv_t
                            : gram[b * B + k] * iab * (1.0 / max(stats[k], kEpsNorm)) * inv_t;
    l[k] = v;
    mx = max(mx, v);
  }
  mx = block_reduce<double, true>(mx, scratch);
  double s = 0;
  for (int64_t k = threadIdx.x; k < B; k += blockDim.x) s += exp(l[k] - mx);
  s = block_reduce(s, scratch);
  if (threadIdx.x == 0) {
    const double lse = mx + log(s);
    stats[2 * B + b] = lse;
    loss[b] = lse - l[b];
  }
}

// One block per row b: Y[b, :] (coefficients of the anchors in d a_hat_b) and coef[0..2, b] =
// (u, v, w): d a_hat_b = Y[b] @ a + u p_b, d p_b = v a_b + w p_b.
__global__ void nce_coef_kernel(const double* __restrict__ grad_loss, const double* __restrict__ logits,
                                const double* __restrict__ stats, double* __restrict__ Y,
                                double* __restrict__ coef, int64_t B, double inv_t, int64_t reduction) {
  const int64_t b = blockIdx.x;
  auto g = [&](int64_t i) {
    return reduction == kReduceNone ? grad_loss[i] : (reduction == kReduceMean ? grad_loss[0] / B : grad_loss[0]);
  };
  auto prob = [&](int64_t i, int64_t k) { return exp(logits[i * B + k] - stats[2 * B + i]); };
  const double gb = g(b);
  for (int64_t k = threadIdx.x; k < B; k += blockDim.x) {
    const double m = gb * prob(b, k) + g(k) * prob(k, b);
    Y[b * B + k] = k == b ? 0.0 : m * (1.0 / max(stats[k], kEpsNorm)) * inv_t;
  }
  if (threadIdx.x == 0) {
    const double c = gb * (prob(b, b) - 1.0);
    const double ia = 1.0 / max(stats[b], kEpsNorm), ip = 1.0 / max(stats[B + b], kEpsNorm);
    coef[b] = c * ip * inv_t;
    coef[B + b] = ip * c * ia * inv_t;
    coef[2 * B + b] = stats[B + b] >= kEpsNorm ? -ip * ip * c * logits[b * B + b] : 0.0;
  }
}

// Pass 1 over chunk (blockIdx.x) of row b: t = da + u p (stored in da), dp = v a + w p, and the
// chunk's sum of a.t into partial[b, chunk].
template <typename scalar_t>
__global__ void nce_grad1_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ p,
                                 scalar_t* __restrict__ da, scalar_t* __restrict__ dp,
                                 const double* __restrict__ coef, double* __restrict__ partial, int64_t B,
                                 int64_t D) {
  __shared__ double scratch[kWarp];
  const int64_t b = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t c1 = min(D, c0 + kChunk);
  const double u = coef[b], v = coef[B + b], w = coef[2 * B + b];
  double dot = 0;
  for (int64_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
    const int64_t j = b * D + i;
    const double av = static_cast<double>(a[j]), pv = static_cast<double>(p[j]);
    const scalar_t t = static_cast<scalar_t>(static_cast<double>(da[j]) + u * pv);
    da[j] = t;
    dot += av * static_cast<double>(t);
    dp[j] = static_cast<scalar_t>(v * av + w * pv);
  }
  dot = block_reduce(dot, scratch);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = dot;
}

// Pass 2: d a_b = ia t - ia^3 (a_b . t) a_b (no projection where the norm was clamped).
template <typename scalar_t>
__global__ void nce_grad2_kernel(const scalar_t* __restrict__ a, scalar_t* __restrict__ da,
                                 const double* __restrict__ stats, const double* __restrict__ partial, int64_t D) {
  const int64_t b = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t c1 = min(D, c0 + kChunk);
  double dot = 0;
  for (int64_t c = 0; c < gridDim.x; ++c) dot += partial[b * gridDim.x + c];
  const double n = stats[b], s = 1.0 / max(n, kEpsNorm), proj = n >= kEpsNorm ? s * s * s * dot : 0.0;
  for (int64_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
    const int64_t j = b * D + i;
    da[j] = static_cast<scalar_t>(s * static_cast<double>(da[j]) - proj * static_cast<double>(a[j]));
  }
}

// ------------------------------------------------------------------ explicit negatives [N,D]
// partial[r, chunk] = sum over one chunk of row r of x^2 (kSquare) or of x.y.
template <typename scalar_t, bool kSquare>
__global__ void nce_rowdot_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                  double* __restrict__ partial, int64_t D) {
  __shared__ double scratch[kWarp];
  const int64_t r = blockIdx.y, c0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t c1 = min(D, c0 + kChunk);
  double s = 0;
  for (int64_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
    const double u = static_cast<double>(x[r * D + i]);
    if constexpr (kSquare) {
      s += u * u;
    } else {
      s += u * static_cast<double>(y[r * D + i]);
    }
  }
  s = block_reduce(s, scratch);
  if (threadIdx.x == 0) partial[r * gridDim.x + blockIdx.x] = s;
}

// out[r] = sqrt(sum of the chunk sums of row r): the negatives' norms.
__global__ void nce_sqrt_sum_kernel(const double* __restrict__ partial, double* __restrict__ out, int64_t R,
                                    int64_t chunks) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  double s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[r * chunks + c];
  out[r] = sqrt(s);
}

// One block per anchor row: logits [b,1+N] (column 0 the positive, -inf in the column
// index[b]), log-sum-exp and the row's loss. Each thread reads back only the logits it wrote.
__global__ void nce_neg_logits_kernel(const double* __restrict__ gram, const double* __restrict__ dots,
                                      double* __restrict__ stats, const double* __restrict__ norms,
                                      const int64_t* __restrict__ index, double* __restrict__ logits,
                                      double* __restrict__ loss, int64_t B, int64_t N, double inv_t) {
  __shared__ double scratch[kWarp];
  const int64_t b = blockIdx.x, own = index[b];
  const double iab = 1.0 / max(stats[b], kEpsNorm);
  const double pos = dots[b] * iab / max(stats[B + b], kEpsNorm) * inv_t;
  double* l = logits + b * (N + 1);
  double mx = pos;
  for (int64_t k = threadIdx.x; k < N; k += blockDim.x) {
    const double v = k == own ? -INFINITY : gram[b * N + k] * iab * (1.0 / max(norms[k], kEpsNorm)) * inv_t;
    l[1 + k] = v;
    mx = max(mx, v);
  }
  mx = block_reduce<double, true>(mx, scratch);
  double s = threadIdx.x == 0 ? exp(pos - mx) : 0.0;
  for (int64_t k = threadIdx.x; k < N; k += blockDim.x) s += exp(l[1 + k] - mx);
  s = block_reduce(s, scratch);
  if (threadIdx.x == 0) {
    const double lse = mx + log(s);
    l[0] = pos;
    stats[2 * B + b] = lse;
    loss[b] = lse - pos;
  }
}

// One block per anchor row b: with W_bk = g_b P_bk / T, Y[b,k] = W_bk / |n_k| (coefficients of the
// raw negatives in d a_hat_b), Z[b,k] = W_bk / |a_b| (of the raw anchors in d n_hat_k, used
// transposed) and coef[0..2, b] = (u, v, w) as nce_coef_kernel, from c_b = -g_b sum_k P_bk.
__global__ void nce_neg_coef_kernel(const double* __restrict__ grad_loss, const double* __restrict__ logits,
                                    const double* __restrict__ stats, const double* __restrict__ norms,
                                    double* __restrict__ Y, double* __restrict__ Z, double* __restrict__ coef,
                                    int64_t B, int64_t N, double inv_t, int64_t reduction) {
  __shared__ double scratch[kWarp];
  const int64_t b = blockIdx.x;
  const double gb =
      reduction == kReduceNone ? grad_loss[b] : (reduction == kReduceMean ? grad_loss[0] / B : grad_loss[0]);
  const double ia = 1.0 / max(stats[b], kEpsNorm), lse = stats[2 * B + b];
  const double* l = logits + b * (N + 1);
  double neg = 0;
  for (int64_t k = threadIdx.x; k < N; k += blockDim.x) {
    const double P = exp(l[1 + k] - lse), W = gb * P * inv_t;
    neg += P;
    Y[b * N + k] = W * (1.0 / max(norms[k], kEpsNorm));
    Z[b * N + k] = W * ia;
  }
  neg = block_reduce(neg, scratch);
  if (threadIdx.x == 0) {
    const double c = -gb * neg, ip = 1.0 / max(stats[B + b], kEpsNorm);
    coef[b] = c * ip * inv_t;
    coef[B + b] = ip * c * ia * inv_t;
    coef[2 * B + b] = stats[B + b] >= kEpsNorm ? -ip * ip * c * l[0] : 0.0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cuda(const at::Tensor& anchors,
                                                                 const at::Tensor& positives,
                                                                 double temperature, int64_t reduction) {
  check_nce(anchors, positives, temperature, reduction, "info_nce_fwd");
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous();
  const int64_t B = a.size(0), D = a.size(1), chunks = ceil_div(D, kChunk);
  TORCH_CHECK(B <= 65535 && chunks <= INT32_MAX, "info_nce_fwd: B must be <= 65535 on CUDA, got ", B);
  const auto f64 = a.options().dtype(at::kDouble);
  at::Tensor partial = at::empty({B, chunks, 3}, f64), dots = at::empty({B}, f64);
  at::Tensor stats = at::empty({3, B}, f64), logits = at::empty({B, B}, f64), rows = at::empty({B}, f64);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_fwd_cuda", [&] {
    nce_stats_kernel<scalar_t><<<dim3(chunks, B), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), partial.data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  nce_norms_kernel<<<ceil_div(B, kThreads), kThreads, 0, stream>>>(partial.const_data_ptr<double>(),
                                                                   stats.data_ptr<double>(), dots.data_ptr<double>(),
                                                                   B, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor gram = at::mm(a, a.t()).to(at::kDouble);  // raw anchors; normalized in the logits
  nce_logits_kernel<<<B, kThreads, 0, stream>>>(gram.const_data_ptr<double>(), dots.const_data_ptr<double>(),
                                                stats.data_ptr<double>(), logits.data_ptr<double>(),
                                                rows.data_ptr<double>(), B, 1.0 / temperature);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor loss = reduction == kReduceNone ? rows : (reduction == kReduceMean ? rows.mean() : rows.sum());
  return {loss.to(a.scalar_type()), logits, stats};
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& anchors,
                                                     const at::Tensor& positives, const at::Tensor& logits,
                                                     const at::Tensor& stats, double temperature, int64_t reduction) {
  check_nce(anchors, positives, temperature, reduction, "info_nce_bwd");
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous();
  const int64_t B = a.size(0), D = a.size(1), chunks = ceil_div(D, kChunk);
  TORCH_CHECK(logits.sizes() == at::IntArrayRef({B, B}) && stats.sizes() == at::IntArrayRef({3, B}) &&
                  logits.scalar_type() == at::kDouble && stats.scalar_type() == at::kDouble &&
                  logits.device() == a.device() && stats.device() == a.device(),
              "info_nce_bwd: logits/stats must be the [B,B]/[3,B] float64 tensors of info_nce_fwd");
  TORCH_CHECK(grad_loss.numel() == (reduction == kReduceNone ? B : 1), "info_nce_bwd: grad_loss has ",
              grad_loss.numel(), " elements for reduction ", reduction);
  TORCH_CHECK(B <= 65535, "info_nce_bwd: B must be <= 65535 on CUDA, got ", B);
  const auto f64 = a.options().dtype(at::kDouble);
  const at::Tensor L = logits.contiguous(), st = stats.contiguous();
  const at::Tensor gl = grad_loss.to(at::kDouble).contiguous();
  at::Tensor Y = at::empty({B, B}, f64), coef = at::empty({3, B}, f64), partial = at::empty({B, chunks}, f64);
  const cudaStream_t stream = current_stream();
  nce_coef_kernel<<<B, kThreads, 0, stream>>>(gl.const_data_ptr<double>(), L.const_data_ptr<double>(),
                                              st.const_data_ptr<double>(), Y.data_ptr<double>(),
                                              coef.data_ptr<double>(), B, 1.0 / temperature, reduction);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor da = at::mm(Y.to(a.scalar_type()), a);
  at::Tensor dp = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_bwd_cuda", [&] {
    const dim3 grid(chunks, B);
    nce_grad1_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a.const_data_ptr<scalar_t>(),
                                                             p.const_data_ptr<scalar_t>(), da.data_ptr<scalar_t>(),
                                                             dp.data_ptr<scalar_t>(), coef.const_data_ptr<double>(),
                                                             partial.data_ptr<double>(), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nce_grad2_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a.const_data_ptr<scalar_t>(), da.data_ptr<scalar_t>(),
                                                             st.const_data_ptr<double>(),
                                                             partial.const_data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, dp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_neg_fwd_cuda(
    const at::Tensor& anchors, const at::Tensor& positives, const at::Tensor& negatives,
    const at::Tensor& anchor_index, double temperature, int64_t reduction) {
  const char* op = "info_nce_neg_fwd";
  check_nce_neg(anchors, positives, negatives, temperature, reduction, op);
  check_anchor_index(anchor_index, anchors, op);
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous(), n = negatives.contiguous();
  const at::Tensor index = anchor_index.contiguous();
  const int64_t B = a.size(0), D = a.size(1), N = n.size(0), chunks = ceil_div(D, kChunk);
  TORCH_CHECK(B <= 65535 && N <= 65535 && chunks <= INT32_MAX, op, ": b and N must be <= 65535 on CUDA, got b=", B,
              ", N=", N);
  const auto f64 = a.options().dtype(at::kDouble);
  at::Tensor partial = at::empty({B, chunks, 3}, f64), dots = at::empty({B}, f64);
  at::Tensor npartial = at::empty({N, chunks}, f64), norms = at::empty({N}, f64);
  at::Tensor stats = at::empty({3, B}, f64), logits = at::empty({B, N + 1}, f64), rows = at::empty({B}, f64);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_neg_fwd_cuda", [&] {
    nce_stats_kernel<scalar_t><<<dim3(chunks, B), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), partial.data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nce_rowdot_kernel<scalar_t, true><<<dim3(chunks, N), kThreads, 0, stream>>>(
        n.const_data_ptr<scalar_t>(), nullptr, npartial.data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  nce_norms_kernel<<<ceil_div(B, kThreads), kThreads, 0, stream>>>(partial.const_data_ptr<double>(),
                                                                   stats.data_ptr<double>(), dots.data_ptr<double>(),
                                                                   B, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nce_sqrt_sum_kernel<<<ceil_div(N, kThreads), kThreads, 0, stream>>>(npartial.const_data_ptr<double>(),
                                                                      norms.data_ptr<double>(), N, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor gram = at::mm(a, n.t()).to(at::kDouble);  // raw rows; normalized in the logits
  nce_neg_logits_kernel<<<B, kThreads, 0, stream>>>(gram.const_data_ptr<double>(), dots.const_data_ptr<double>(),
                                                    stats.data_ptr<double>(), norms.const_data_ptr<double>(),
                                                    index.const_data_ptr<int64_t>(), logits.data_ptr<double>(),
                                                    rows.data_ptr<double>(), B, N, 1.0 / temperature);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor loss = reduction == kReduceNone ? rows : (reduction == kReduceMean ? rows.mean() : rows.sum());
  return {loss.to(a.scalar_type()), logits, stats, norms};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_neg_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& positives, const at::Tensor& negatives,
    const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& neg_norms, double temperature,
    int64_t reduction) {
  const char* op = "info_nce_neg_bwd";
  check_nce_neg(anchors, positives, negatives, temperature, reduction, op);  // the logits carry the exclusions
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous(), n = negatives.contiguous();
  const int64_t B = a.size(0), D = a.size(1), N = n.size(0), chunks = ceil_div(D, kChunk);
  TORCH_CHECK(logits.sizes() == at::IntArrayRef({B, N + 1}) && stats.sizes() == at::IntArrayRef({3, B}) &&
                  neg_norms.sizes() == at::IntArrayRef({N}) && logits.scalar_type() == at::kDouble &&
                  stats.scalar_type() == at::kDouble && neg_norms.scalar_type() == at::kDouble &&
                  logits.device() == a.device() && stats.device() == a.device() && neg_norms.device() == a.device(),
              op, ": logits/stats/neg_norms must be the [b,1+N]/[3,b]/[N] float64 tensors of info_nce_neg_fwd");
  TORCH_CHECK(grad_loss.numel() == (reduction == kReduceNone ? B : 1), op, ": grad_loss has ", grad_loss.numel(),
              " elements for reduction ", reduction);
  TORCH_CHECK(B <= 65535 && N <= 65535, op, ": b and N must be <= 65535 on CUDA, got b=", B, ", N=", N);
  const auto f64 = a.options().dtype(at::kDouble);
  const at::Tensor L = logits.contiguous(), st = stats.contiguous(), nn = neg_norms.contiguous();
  const at::Tensor gl = grad_loss.to(at::kDouble).contiguous();
  at::Tensor Y = at::empty({B, N}, f64), Z = at::empty({B, N}, f64), coef = at::empty({3, B}, f64);
  at::Tensor partial = at::empty({B, chunks}, f64), npartial = at::empty({N, chunks}, f64);
  const cudaStream_t stream = current_stream();
  nce_neg_coef_kernel<<<B, kThreads, 0, stream>>>(gl.const_data_ptr<double>(), L.const_data_ptr<double>(),
                                                  st.const_data_ptr<double>(), nn.const_data_ptr<double>(),
                                                  Y.data_ptr<double>(), Z.data_ptr<double>(), coef.data_ptr<double>(),
                                                  B, N, 1.0 / temperature, reduction);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor da = at::mm(Y.to(a.scalar_type()), n);
  at::Tensor dn = at::mm(Z.to(a.scalar_type()).t(), a);
  at::Tensor dp = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_neg_bwd_cuda", [&] {
    const dim3 grid(chunks, B), ngrid(chunks, N);
    nce_grad1_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a.const_data_ptr<scalar_t>(),
                                                             p.const_data_ptr<scalar_t>(), da.data_ptr<scalar_t>(),
                                                             dp.data_ptr<scalar_t>(), coef.const_data_ptr<double>(),
                                                             partial.data_ptr<double>(), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nce_grad2_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a.const_data_ptr<scalar_t>(), da.data_ptr<scalar_t>(),
                                                             st.const_data_ptr<double>(),
                                                             partial.const_data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // the negatives: n_k . t_k for the projection, then the same scaling pass with their norms
    nce_rowdot_kernel<scalar_t, false><<<ngrid, kThreads, 0, stream>>>(
        n.const_data_ptr<scalar_t>(), dn.const_data_ptr<scalar_t>(), npartial.data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nce_grad2_kernel<scalar_t><<<ngrid, kThreads, 0, stream>>>(n.const_data_ptr<scalar_t>(), dn.data_ptr<scalar_t>(),
                                                              nn.const_data_ptr<double>(),
                                                              npartial.const_data_ptr<double>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, dp, dn};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(cgc, CUDA, m) {
  m.impl("info_nce_fwd", &cuda::info_nce_fwd_cuda);
  m.impl("info_nce_bwd", &cuda::info_nce_bwd_cuda);
  m.impl("info_nce_neg_fwd", &cuda::info_nce_neg_fwd_cuda);
  m.impl("info_nce_neg_bwd", &cuda::info_nce_neg_bwd_cuda);
}

}  // namespace cgc
