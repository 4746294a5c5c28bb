// InfoNCE on the CPU. The forward reads anchors and positives once for the norms and the
// positive dots, and the anchors once more inside the Gram matmul (on the raw rows: the
// normalization is applied to the B x B result, never to a copy of the data). The backward is
// one matmul (B x B coefficients times the anchors) plus one fused pass per row that adds the
// positive term, projects out the normalization and writes both gradients. B x B quantities
// and per-element coefficients are computed in double (see cgc.h). The explicit-negatives form
// (info_nce_neg) is the same algorithm on a b x N Gram of anchors and negatives, with one more
// matmul and fused row pass for the negatives' gradient.
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

// Sum of squares of a row, in double with 8 partial sums.
template <typename scalar_t>
double row_sumsq(const scalar_t* x, int64_t n) {
  double s8[8] = {}, s = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const double v = static_cast<double>(x[i + l]);
      s8[l] += v * v;
    }
  for (; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (int l = 0; l < 8; ++l) s += s8[l];
  return s;
}

// The last pass over R rows x [R,D] of one input: dx holds the matmul part of d x_hat (the rows'
// coefficients times the rows they were contrasted with); with kPositive (the anchors) it becomes
// t = dx + u p, and d p = v x + w p is written; then d x = ix (t - x_hat (x_hat . t)), only the
// scale ix = 1/|x| where the norm was clamped (norm < kEpsNorm).
template <typename scalar_t, bool kPositive>
void finish_rows(scalar_t* pdx, scalar_t* pdp, const scalar_t* px, const scalar_t* pp, const double* u,
                 const double* v, const double* w, const double* ix, const double* norm, int64_t R, int64_t D) {
  at::parallel_for(0, R, grain((kPositive ? 5 : 3) * D), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      scalar_t* x = pdx + b * D;
      const scalar_t* ar = px + b * D;
      // t = d x_hat_b (stored in dx), dp_b, and x_b . t for the projection below
      double dots[8] = {}, dot = 0;
      int64_t i = 0;
      if constexpr (kPositive) {
        scalar_t* z = pdp + b * D;
        const scalar_t* pr = pp + b * D;
        const double ub = u[b], vb = v[b], wb = w[b];
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
      } else {
        for (; i + 8 <= D; i += 8)
          for (int l = 0; l < 8; ++l) dots[l] += static_cast<double>(ar[i + l]) * static_cast<double>(x[i + l]);
        for (; i < D; ++i) dot += static_cast<double>(ar[i]) * static_cast<double>(x[i]);
      }
      for (int l = 0; l < 8; ++l) dot += dots[l];
      // d x_b = ix (t - x_hat (x_hat . t)); only the scale where the norm was clamped
      const double s = ix[b], proj = norm[b] >= kEpsNorm ? s * s * s * dot : 0.0;
      for (int64_t j = 0; j < D; ++j)
        x[j] = static_cast<scalar_t>(s * static_cast<double>(x[j]) - proj * static_cast<double>(ar[j]));
    }
  });
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
  // Gram of the raw anchors (normalized below), accumulated in the BLAS' precision
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
    finish_rows<scalar_t, true>(da.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                p.const_data_ptr<scalar_t>(), u.data(), v.data(), w.data(), ia.data(), st, B, D);
  });
  return {da, dp};
}

// Explicit negatives: logits [b,1+N] = [a_hat_b . p_hat_b, a_hat_b . n_hat_k] / T with -inf where
// k = anchor_index[b]; the Gram a n^T is taken on the raw rows and normalized here.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_neg_fwd_cpu(
    const at::Tensor& anchors, const at::Tensor& positives, const at::Tensor& negatives,
    const at::Tensor& anchor_index, double temperature, int64_t reduction) {
  const char* op = "info_nce_neg_fwd";
  check_nce_neg(anchors, positives, negatives, temperature, reduction, op);
  check_anchor_index(anchor_index, anchors, op);
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous(), n = negatives.contiguous();
  const at::Tensor index = anchor_index.contiguous();
  const int64_t B = a.size(0), D = a.size(1), N = n.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(idx[b] >= -1 && idx[b] < N, op, ": anchor_index[", b, "] = ", idx[b], " is outside [-1, ", N, ")");
    TORCH_CHECK(N > 1 || idx[b] < 0, op, ": anchor ", b, " is the only negative (N = 1): no negative is left");
  }
  const auto f64 = a.options().dtype(at::kDouble);
  at::Tensor logits = at::empty({B, N + 1}, f64);
  at::Tensor stats = at::empty({3, B}, f64);
  at::Tensor norms = at::empty({N}, f64);
  at::Tensor rows = at::empty({B}, f64);
  const at::Tensor gram = at::mm(a, n.t()).to(at::kDouble);  // raw rows, normalized below
  std::vector<double> dots(B);
  double* st = stats.data_ptr<double>();
  double* nn = norms.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_neg_fwd_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* pn = n.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(2 * D), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double aa, qq, ap;
        row_stats(pa + b * D, pp + b * D, D, aa, qq, ap);
        st[b] = std::sqrt(aa);
        st[B + b] = std::sqrt(qq);
        dots[b] = ap;
      }
    });
    at::parallel_for(0, N, grain(D), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) nn[k] = std::sqrt(row_sumsq(pn + k * D, D));
    });
  });
  const double inv_t = 1.0 / temperature;
  const double* g = gram.const_data_ptr<double>();
  double* L = logits.data_ptr<double>();
  double* loss = rows.data_ptr<double>();
  std::vector<double> in(N);
  for (int64_t k = 0; k < N; ++k) in[k] = 1.0 / std::max(nn[k], kEpsNorm);
  at::parallel_for(0, B, grain(16 * N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double* l = L + b * (N + 1);
      const double iab = 1.0 / std::max(st[b], kEpsNorm);
      l[0] = dots[b] * iab / std::max(st[B + b], kEpsNorm) * inv_t;
      double mx = l[0];
      for (int64_t k = 0; k < N; ++k) {
        l[1 + k] = k == idx[b] ? -std::numeric_limits<double>::infinity() : g[b * N + k] * iab * in[k] * inv_t;
        mx = std::max(mx, l[1 + k]);
      }
      double s = 0;
      for (int64_t k = 0; k <= N; ++k) s += std::exp(l[k] - mx);
      st[2 * B + b] = mx + std::log(s);
      loss[b] = st[2 * B + b] - l[0];
    }
  });
  at::Tensor loss_t = reduction == kReduceNone ? rows : (reduction == kReduceMean ? rows.mean() : rows.sum());
  return {loss_t.to(a.scalar_type()), logits, stats, norms};
}

// With W_bk = g_b P_bk / T (P the softmax of row b's logits; 0 in the excluded column):
// d a_hat_b = sum_k W_bk n_hat_k + c_b p_hat_b / T, d n_hat_k = sum_b W_bk a_hat_b and
// d p_hat_b = c_b a_hat_b / T, c_b = -g_b (1 - P_b0) summed over the negatives' probabilities (no
// cancellation when the positive dominates); then each through its normalization (finish_rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_neg_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& anchors, const at::Tensor& positives, const at::Tensor& negatives,
    const at::Tensor& logits, const at::Tensor& stats, const at::Tensor& neg_norms, double temperature,
    int64_t reduction) {
  const char* op = "info_nce_neg_bwd";
  check_nce_neg(anchors, positives, negatives, temperature, reduction, op);  // the logits carry the exclusions
  const at::Tensor a = anchors.contiguous(), p = positives.contiguous(), n = negatives.contiguous();
  const int64_t B = a.size(0), D = a.size(1), N = n.size(0);
  TORCH_CHECK(logits.sizes() == at::IntArrayRef({B, N + 1}) && stats.sizes() == at::IntArrayRef({3, B}) &&
                  neg_norms.sizes() == at::IntArrayRef({N}) && logits.scalar_type() == at::kDouble &&
                  stats.scalar_type() == at::kDouble && neg_norms.scalar_type() == at::kDouble,
              op, ": logits/stats/neg_norms must be the [b,1+N]/[3,b]/[N] float64 tensors of info_nce_neg_fwd");
  TORCH_CHECK(grad_loss.numel() == (reduction == kReduceNone ? B : 1), op, ": grad_loss has ", grad_loss.numel(),
              " elements for reduction ", reduction);
  const at::Tensor Lt = logits.contiguous(), stt = stats.contiguous(), nnt = neg_norms.contiguous();
  const at::Tensor gl = grad_loss.to(at::kDouble).contiguous();
  const double* L = Lt.const_data_ptr<double>();
  const double* st = stt.const_data_ptr<double>();
  const double* nn = nnt.const_data_ptr<double>();
  const double* glp = gl.const_data_ptr<double>();
  const double inv_t = 1.0 / temperature;
  std::vector<double> ia(B), u(B), v(B), w(B), in(N);
  for (int64_t k = 0; k < N; ++k) in[k] = 1.0 / std::max(nn[k], kEpsNorm);
  // Y: coefficients of the raw n_k in d a_hat_b (W_bk / |n_k|); Z: of the raw a_b in d n_hat_k
  // (W_bk / |a_b|), stored [b,N] and used transposed by the matmul
  at::Tensor Y = at::empty({B, N}, a.options().dtype(at::kDouble)), Z = at::empty_like(Y);
  double* y = Y.data_ptr<double>();
  double* z = Z.data_ptr<double>();
  at::parallel_for(0, B, grain(16 * N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const double gb = reduction == kReduceNone ? glp[b] : (reduction == kReduceMean ? glp[0] / B : glp[0]);
      const double iab = 1.0 / std::max(st[b], kEpsNorm), ip = 1.0 / std::max(st[B + b], kEpsNorm);
      const double* l = L + b * (N + 1);
      const double lse = st[2 * B + b];
      double neg = 0;
      for (int64_t k = 0; k < N; ++k) {
        const double P = std::exp(l[1 + k] - lse), W = gb * P * inv_t;
        neg += P;
        y[b * N + k] = W * in[k];
        z[b * N + k] = W * iab;
      }
      const double c = -gb * neg;
      ia[b] = iab;
      u[b] = c * ip * inv_t;  // p_b coefficient of d a_hat_b
      v[b] = ip * c * iab * inv_t;
      w[b] = st[B + b] >= kEpsNorm ? -ip * ip * c * l[0] : 0.0;
    }
  });
  at::Tensor da = at::mm(Y.to(a.scalar_type()), n);
  at::Tensor dn = at::mm(Z.to(a.scalar_type()).t(), a);
  at::Tensor dp = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "info_nce_neg_bwd_cpu", [&] {
    finish_rows<scalar_t, true>(da.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                p.const_data_ptr<scalar_t>(), u.data(), v.data(), w.data(), ia.data(), st, B, D);
    finish_rows<scalar_t, false>(dn.data_ptr<scalar_t>(), nullptr, n.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                 nullptr, nullptr, in.data(), nn, N, D);
  });
  return {da, dp, dn};
}

}  // namespace

TORCH_LIBRARY_IMPL(cgc, CPU, m) {
  m.impl("info_nce_fwd", &info_nce_fwd_cpu);
  m.impl("info_nce_bwd", &info_nce_bwd_cpu);
  m.impl("info_nce_neg_fwd", &info_nce_neg_fwd_cpu);
  m.impl("info_nce_neg_bwd", &info_nce_neg_bwd_cpu);
}

}  // namespace cgc
