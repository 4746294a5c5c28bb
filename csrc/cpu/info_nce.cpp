// InfoNCE on the CPU. The forward reads anchors and positives once for the norms and the
// positive dots, and the anchors once more inside the Gram matmul (on the raw rows: the
// normalisation is applied to the B x B result, never to a copy of the data). The backward is
// one matmul (B x B coefficients times the anchors) plus one fused pass per row that adds the
// positive term, projects out the normalisation and writes both gradients. B x B quantities
// and per-element coefficients are computed in double (see cgc.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../cgc.h"

namespace cgc {
namespace {

// Sum of squares of a row, of p, and a.p, in double with 8 partial sums (vectorisable).
template <typename scalar_t>
void row_stats(const scalar_t* a, const scalar_t* p, int64_t n, double& aa, double& pp, double& ap) {
  double sa[8] = {}, sp[8] = {}, sx[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const double x = static_cast<double>(a[i + l]), y = static_cast<double>(p[i + l]);
      sa[l] += x * x;
      sp[l] += y * y;
      sx[l] += x * y;
    }
  aa = pp = ap = 0;
  for (; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(p[i]);
    aa += x * x;
    pp += y * y;
    ap += x * y;
  }
  for (int l = 0; l < 8; ++l) aa += sa[l], pp += sp[l], ap += sx[l];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cpu(const at::Tensor& anchors,
                                                                const at::Tensor& positives,
                                                                double temperature, int64_t reduction) {
  check_nce(anchors, positives, temperature, reduction, "info_nce_fwd");
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous();
  const int64_t B = a.size(0), D = a.size(1);
  const auto f64 = a.options().dtype(at::kDouble);
  at::Tensor logits = at::empty({B, B}, f64);
  at::Tensor stats = at::empty({3, B}, f64);
  at::Tensor rows = at::empty({B}, f64);
  // Gram of the raw anchors (normalised below), accumulated in the BLAS' precision
  const at::Tensor gram = at::mm(a, a.t()).to(at::kDouble);
  std::vector<double> dots(B);
  double* st = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_fwd_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(2 * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double aa, qq, ap;
        row_stats(pa + b * D, pp + b * D, D, aa, qq, ap);
        st[b] = std::sqrt(aa);
        st[B + b] = std::sqrt(qq);
        dots[b] = ap;
      }
    });
  });
  const double inv_t = 1.0 / temperature;
  const double* g = gram.const_data_ptr<double>();
  double* L = logits.data_ptr<double>();
  double* loss = rows.data_ptr<double>();
  std::vector<double> ia(B);
  for (int64_t b = 0; b < B; ++b) ia[b] = 1.0 / std::max(st[b], kEpsNorm);
  // rows of the B x B logits are independent (B^2 exp in double: worth threads for large B)
  at::parallel_for(0, B, grain(16 * B), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* l = L + b * B;
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t k = 0; k < B; ++k) {
        l[k] = k == b ? dots[b] * ia[b] / std::max(st[B + b], kEpsNorm) * inv_t : g[b * B + k] * ia[b] * ia[k] * inv_t;
        mx = std::max(mx, l[k]);
      }
      double s = 0;
      for (int64_t k = 0; k < B; ++k) s += std::exp(l[k] - mx);
      st[2 * B + b] = mx + std::log(s);
      loss[b] = st[2 * B + b] - l[b];
    }
  });
  at::Tensor loss_t = reduction == kReduceNone ? rows : (reduction == kReduceMean ? rows.mean() : rows.sum());
  return {loss_t.to(a.scalar_type()), logits, stats};
}

std::tuple<at::Tensor, at::Tensor> info_nce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& anchors,
                                                    const at::Tensor& positives, const at::Tensor& logits,
                                                    const at::Tensor& stats, double temperature, int64_t reduction) {
  check_nce(anchors, positives, temperature, reduction, "info_nce_bwd");
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous();
  const int64_t B = a.size(0), D = a.size(1);
  TORCH_CHECK(logits.sizes() == at::IntArrayRef({B, B}) && stats.sizes() == at::IntArrayRef({3, B}) &&
                  logits.scalar_type() == at::kDouble && stats.scalar_type() == at::kDouble,
              "info_nce_bwd: logits/stats must be the [B,B]/[3,B] float64 tensors of info_nce_fwd");
  TORCH_CHECK(grad_loss.numel() == (reduction == kReduceNone ? B : 1), "info_nce_bwd: grad_loss has ",
              grad_loss.numel(), " elements for reduction ", reduction);
  const at::Tensor Lt = logits.contiguous(), stt = stats.contiguous();
  const at::Tensor gl = grad_loss.to(at::kDouble).contiguous();
  const double* L = Lt.const_data_ptr<double>();
  const double* st = stt.const_data_ptr<double>();
  const double* glp = gl.const_data_ptr<double>();
  const double inv_t = 1.0 / temperature;
  std::vector<double> g(B), P(B * B), ia(B), ip(B), u(B), v(B), w(B);
  for (int64_t b = 0; b < B; ++b) {
    g[b] = reduction == kReduceNone ? glp[b] : (reduction == kReduceMean ? glp[0] / B : glp[0]);
    ia[b] = 1.0 / std::max(st[b], kEpsNorm);
    ip[b] = 1.0 / std::max(st[B + b], kEpsNorm);
  }
  at::parallel_for(0, B, grain(16 * B), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t k = 0; k < B; ++k) P[b * B + k] = std::exp(L[b * B + k] - st[2 * B + b]);
  });
  // d a_hat_b = (c_b p_hat_b + sum_k M_bk a_hat_k) / T with c the gradient of the positive
  // logit and M_bk that of a_b.a_k (held by rows b and k); Y holds the a_k coefficients.
  at::Tensor Y = at::empty({B, B}, a.options().dtype(at::kDouble));
  double* y = Y.data_ptr<double>();
  at::parallel_for(0, B, grain(4 * B), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double c = g[b] * (P[b * B + b] - 1.0);
      for (int64_t k = 0; k < B; ++k)
        y[b * B + k] = k == b ? 0.0 : (g[b] * P[b * B + k] + g[k] * P[k * B + b]) * ia[k] * inv_t;
      u[b] = c * ip[b] * inv_t;  // p_b coefficient of d a_hat_b
      // d p_b = ip (d p_hat - p_hat (p_hat . d p_hat)), d p_hat = c a_hat / T, p_hat . d p_hat = c L_bb
      v[b] = ip[b] * c * ia[b] * inv_t;
      w[b] = st[B + b] >= kEpsNorm ? -ip[b] * ip[b] * c * L[b * B + b] : 0.0;
    }
  });
  at::Tensor da = at::mm(Y.to(a.scalar_type()), a);
  at::Tensor dp = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_bwd_cpu", [&] {
    scalar_t* pda = da.data_ptr<scalar_t>();
    scalar_t* pdp = dp.data_ptr<scalar_t>();
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(5 * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* x = pda + b * D;
        scalar_t* z = pdp + b * D;
        const scalar_t* ar = pa + b * D;
        const scalar_t* pr = pp + b * D;
        const double ub = u[b], vb = v[b], wb = w[b];
        // t = d a_hat_b (stored in da), dp_b, and a_b . t for the projection below
        double dots[8] = {}, dot = 0;
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
          for (int l = 0; l < 8; ++l) {
            const double av = static_cast<double>(ar[i + l]), pv = static_cast<double>(pr[i + l]);
            const scalar_t t = static_cast<scalar_t>(static_cast<double>(x[i + l]) + ub * pv);
            x[i + l] = t;
            dots[l] += av * static_cast<double>(t);
            z[i + l] = static_cast<scalar_t>(vb * av + wb * pv);
          }
        for (; i < D; ++i) {
          const double av = static_cast<double>(ar[i]), pv = static_cast<double>(pr[i]);
          const scalar_t t = static_cast<scalar_t>(static_cast<double>(x[i]) + ub * pv);
          x[i] = t;
          dot += av * static_cast<double>(t);
          z[i] = static_cast<scalar_t>(vb * av + wb * pv);
        }
        for (int l = 0; l < 8; ++l) dot += dots[l];
        // d a_b = ia (t - a_hat (a_hat . t)); only the scale where the norm was clamped
        const double s = ia[b], proj = st[b] >= kEpsNorm ? s * s * s * dot : 0.0;
        for (int64_t j = 0; j < D; ++j)
          x[j] = static_cast<scalar_t>(s * static_cast<double>(x[j]) - proj * static_cast<double>(ar[j]));
      }
    });
  });
  return {da, dp};
}

}  // namespace

TORCH_LIBRARY_IMPL(cgc, CPU, m) {
  m.impl("info_nce_fwd", &info_nce_fwd_cpu);
  m.impl("info_nce_bwd", &info_nce_bwd_cpu);
}

}  // namespace cgc
