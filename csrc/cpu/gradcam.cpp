// Grad-CAM on the CPU: one pass over the activations (and gradients) per map for the forward,
// one pass per channel row for the backward, with the ReLU mask read off the forward result.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../cgc.h"

namespace cgc {
namespace {

// Spatial mean of one gradient row, the channel weight of pooled Grad-CAM.
template <typename scalar_t, typename acc_t>
inline acc_t row_mean(const scalar_t* g, int64_t n) {
  acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<acc_t>(g[i + l]);
  acc_t s = 0;
  for (; i < n; ++i) s += static_cast<acc_t>(g[i]);
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s / static_cast<acc_t>(n);
}

at::Tensor gradcam_fwd_cpu(const at::Tensor& activations, const at::Tensor& gradients, bool pool) {
  check_gradcam(activations, gradients, "gradcam_fwd");
  const at::Tensor A = activations.contiguous();
  const at::Tensor G = gradients.contiguous();
  const int64_t B = A.size(0), K = A.size(1), HW = A.size(2) * A.size(3);
  at::Tensor out = at::empty({B, A.size(2), A.size(3)}, A.options());
  const bool elementwise = G.dim() == 4 && !pool;
  const bool weights = G.dim() == 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(2 * K * HW), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> acc(HW);
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* ar = a + (b * K + k) * HW;
          if (elementwise) {
            const scalar_t* gr = g + (b * K + k) * HW;
            for (int64_t i = 0; i < HW; ++i)
              acc[i] += static_cast<acc_t>(gr[i]) * static_cast<acc_t>(ar[i]);
          } else {
            const acc_t w = weights ? static_cast<acc_t>(g[b * K + k])
                                    : row_mean<scalar_t, acc_t>(g + (b * K + k) * HW, HW);
            for (int64_t i = 0; i < HW; ++i) acc[i] += w * static_cast<acc_t>(ar[i]);
          }
        }
        for (int64_t i = 0; i < HW; ++i) o[b * HW + i] = static_cast<scalar_t>(acc[i] > 0 ? acc[i] : acc_t(0));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gradcam_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                                   const at::Tensor& activations, const at::Tensor& gradients,
                                                   bool pool) {
  check_gradcam(activations, gradients, "gradcam_bwd");
  check_gradcam_map(grad_out, activations, "gradcam_bwd", "grad_out");
  check_gradcam_map(out, activations, "gradcam_bwd", "out");
  const at::Tensor A = activations.contiguous();
  const at::Tensor G = gradients.contiguous();
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor o = out.contiguous();
  const int64_t B = A.size(0), K = A.size(1), HW = A.size(2) * A.size(3);
  at::Tensor dA = at::empty_like(A);
  at::Tensor dG = at::empty_like(G);
  const bool elementwise = G.dim() == 4 && !pool;
  const bool weights = G.dim() == 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "gradcam_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    scalar_t* da = dA.data_ptr<scalar_t>();
    scalar_t* dg = dG.data_ptr<scalar_t>();
    // grad_out through the ReLU (zero where the forward map was clamped), once per map.
    std::vector<acc_t> gm(B * HW);
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < B * HW; ++i)
      gm[i] = static_cast<acc_t>(op[i]) > 0 ? static_cast<acc_t>(gop[i]) : acc_t(0);
    at::parallel_for(0, B * K, grain(4 * HW), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* m = gm.data() + (r / K) * HW;
        const scalar_t* ar = a + r * HW;
        scalar_t* dar = da + r * HW;
        if (elementwise) {
          const scalar_t* gr = g + r * HW;
          scalar_t* dgr = dg + r * HW;
          for (int64_t i = 0; i < HW; ++i) {
            dar[i] = static_cast<scalar_t>(m[i] * static_cast<acc_t>(gr[i]));
            dgr[i] = static_cast<scalar_t>(m[i] * static_cast<acc_t>(ar[i]));
          }
          continue;
        }
        const acc_t w = weights ? static_cast<acc_t>(g[r]) : row_mean<scalar_t, acc_t>(g + r * HW, HW);
        acc_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= HW; i += 8)
          for (int l = 0; l < 8; ++l) {
            lanes[l] += m[i + l] * static_cast<acc_t>(ar[i + l]);
            dar[i + l] = static_cast<scalar_t>(m[i + l] * w);
          }
        acc_t s = 0;
        for (; i < HW; ++i) {
          s += m[i] * static_cast<acc_t>(ar[i]);
          dar[i] = static_cast<scalar_t>(m[i] * w);
        }
        for (int l = 0; l < 8; ++l) s += lanes[l];
        if (weights) {
          dg[r] = static_cast<scalar_t>(s);
        } else {
          const scalar_t v = static_cast<scalar_t>(s / static_cast<acc_t>(HW));
          scalar_t* dgr = dg + r * HW;
          for (int64_t j = 0; j < HW; ++j) dgr[j] = v;
        }
      }
    });
  });
  return {dA, dG};
}

}  // namespace

TORCH_LIBRARY_IMPL(cgc, CPU, m) {
  m.impl("gradcam_fwd", &gradcam_fwd_cpu);
  m.impl("gradcam_bwd", &gradcam_bwd_cpu);
}

}  // namespace cgc
