// Autograd kernels of the cgc ops (dispatch key Autograd, every device), in C++ so that the
// autograd bookkeeping of a call costs what eager ATen ops cost: on small maps, and on GPUs at
// every listed size, the Python torch.library.register_autograd path cost more host time than the
// kernels themselves. Each forward op saves what its backward op needs and calls it through the
// dispatcher, so a backward run with create_graph records it for higher-order gradients:
// gradcam and affine_warp are differentiable to any order, info_nce (both forms) once.
#include <torch/autograd.h>
#include <torch/library.h>

#include "cgc.h"

namespace cgc {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

// The ops below the Autograd key, looked up once.
Tensor gradcam_fwd_op(const Tensor& A, const Tensor& G, bool pool) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::gradcam_fwd", "")
                       .typed<Tensor(const Tensor&, const Tensor&, bool)>();
  return op.call(A, G, pool);
}

std::tuple<Tensor, Tensor> gradcam_bwd_op(const Tensor& go, const Tensor& out, const Tensor& A, const Tensor& G,
                                          bool pool) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::gradcam_bwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, bool)>();
  return op.call(go, out, A, G, pool);
}

Tensor warp_fwd_op(const Tensor& x, const Tensor& theta, c10::SymInt h, c10::SymInt w, int64_t padding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::affine_warp_fwd", "")
                       .typed<Tensor(const Tensor&, const Tensor&, c10::SymInt, c10::SymInt, int64_t)>();
  return op.call(x, theta, std::move(h), std::move(w), padding);
}

Tensor warp_bwd_op(const Tensor& go, const Tensor& theta, c10::SymInt h, c10::SymInt w, int64_t padding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::affine_warp_bwd", "")
                       .typed<Tensor(const Tensor&, const Tensor&, c10::SymInt, c10::SymInt, int64_t)>();
  return op.call(go, theta, std::move(h), std::move(w), padding);
}

std::tuple<Tensor, Tensor, Tensor> nce_fwd_op(const Tensor& a, const Tensor& p, double t, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::info_nce_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, int64_t)>();
  return op.call(a, p, t, reduction);
}

std::tuple<Tensor, Tensor> nce_bwd_op(const Tensor& gl, const Tensor& a, const Tensor& p, const Tensor& logits,
                                      const Tensor& stats, double t, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::info_nce_bwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&, double, int64_t)>();
  return op.call(gl, a, p, logits, stats, t, reduction);
}

using NegFwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using NegBwdResult = std::tuple<Tensor, Tensor, Tensor>;

NegFwdResult nce_neg_fwd_op(const Tensor& a, const Tensor& p, const Tensor& n, const Tensor& index, double t,
                            int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::info_nce_neg_fwd", "")
                       .typed<NegFwdResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t)>();
  return op.call(a, p, n, index, t, reduction);
}

NegBwdResult nce_neg_bwd_op(const Tensor& gl, const Tensor& a, const Tensor& p, const Tensor& n, const Tensor& logits,
                            const Tensor& stats, const Tensor& norms, double t, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cgc::info_nce_neg_bwd", "")
                       .typed<NegBwdResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, double, int64_t)>();
  return op.call(gl, a, p, n, logits, stats, norms, t, reduction);
}

// ---------------------------------------------------------------------------------- gradcam
// The channel weights P(x) of gradcam broadcast to [B,K,H,W] (x shaped like the gradients):
// spatial mean (pool), identity (element-wise) or the given [B,K] weights.
Tensor pooled(const Tensor& x, bool pool) {
  if (x.dim() == 2) return x.unsqueeze(-1).unsqueeze(-1);
  return pool ? x.mean({2, 3}, /*keepdim=*/true) : x;
}

struct GradcamFwd : public Function<GradcamFwd> {
  static Tensor forward(AutogradContext* ctx, const Tensor& A, const Tensor& G, bool pool) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = gradcam_fwd_op(A, G, pool);
    ctx->save_for_backward({A, G, out});
    ctx->saved_data["pool"] = pool;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [dA, dG] = gradcam_bwd_op(grads[0], saved[2], saved[0], saved[1], ctx->saved_data["pool"].toBool());
    return {dA, dG, Tensor()};
  }
};

// gradcam_bwd(go, out, A, G) = (m go P(G), P^T(m go A)) with m = (out > 0) is bilinear in (go, A)
// and (go, G): its vector-Jacobian product with (gA, gG) is gradcam_bwd(go, out, gA, gG) for
// (A, G), and m * (sum_k gA P(G) + sum_k A P(gG)) for go. `out` only carries the mask.
struct GradcamBwd : public Function<GradcamBwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& go, const Tensor& out, const Tensor& A,
                               const Tensor& G, bool pool) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dA, dG] = gradcam_bwd_op(go, out, A, G, pool);
    ctx->save_for_backward({go, out, A, G});
    ctx->saved_data["pool"] = pool;
    return {dA, dG};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &go = saved[0], &out = saved[1], &A = saved[2], &G = saved[3];
    const bool pool = ctx->saved_data["pool"].toBool();
    const Tensor &gA = grads[0], &gG = grads[1];
    auto [dA, dG] = gradcam_bwd_op(go, out, gA, gG, pool);
    Tensor lin = (gA * pooled(G, pool)).sum(1) + (A * pooled(gG, pool)).sum(1);
    Tensor d_go = lin.masked_fill(out <= 0, 0);
    return {d_go, Tensor(), dA, dG, Tensor()};
  }
};

Tensor gradcam_fwd_autograd(const Tensor& A, const Tensor& G, bool pool) {
  return GradcamFwd::apply(A, G, pool);
}

std::tuple<Tensor, Tensor> gradcam_bwd_autograd(const Tensor& go, const Tensor& out, const Tensor& A,
                                                const Tensor& G, bool pool) {
  auto r = GradcamBwd::apply(go, out, A, G, pool);
  return {r[0], r[1]};
}

// ------------------------------------------------------------------------------ affine_warp
// Forward and backward are each other's transpose (both linear in their tensor input), so one
// Function serves both: Warp<true> runs affine_warp_fwd and differentiates to affine_warp_bwd,
// Warp<false> the other way round. theta is data, not differentiated (as in cgc.ops.affine_warp).
template <bool kForward>
struct Warp : public Function<Warp<kForward>> {
  static Tensor run(bool forward, const Tensor& x, const Tensor& theta, c10::SymInt h, c10::SymInt w,
                    int64_t padding) {
    return forward ? warp_fwd_op(x, theta, std::move(h), std::move(w), padding)
                   : warp_bwd_op(x, theta, std::move(h), std::move(w), padding);
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& theta, c10::SymInt h, c10::SymInt w,
                        int64_t padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({theta});
    ctx->saved_data["h"] = x.sym_size(2);  // the size the transpose maps back to
    ctx->saved_data["w"] = x.sym_size(3);
    ctx->saved_data["padding"] = padding;
    return run(kForward, x, theta, std::move(h), std::move(w), padding);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Tensor d = run(!kForward, grads[0], ctx->get_saved_variables()[0], ctx->saved_data["h"].toSymInt(),
                   ctx->saved_data["w"].toSymInt(), ctx->saved_data["padding"].toInt());
    return {d, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor warp_fwd_autograd(const Tensor& x, const Tensor& theta, c10::SymInt h, c10::SymInt w, int64_t padding) {
  return Warp<true>::apply(x, theta, std::move(h), std::move(w), padding);
}

Tensor warp_bwd_autograd(const Tensor& go, const Tensor& theta, c10::SymInt h, c10::SymInt w, int64_t padding) {
  return Warp<false>::apply(go, theta, std::move(h), std::move(w), padding);
}

// --------------------------------------------------------------------------------- info_nce
struct NceFwd : public Function<NceFwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& p, double t,
                               int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, logits, stats] = nce_fwd_op(a, p, t, reduction);
    ctx->save_for_backward({a, p, logits, stats});
    ctx->saved_data["t"] = t;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({logits, stats});
    return {loss, logits, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto [da, dp] = nce_bwd_op(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["t"].toDouble(),
                               ctx->saved_data["reduction"].toInt());
    return {da, dp, Tensor(), Tensor()};
  }
};

// The backward itself is not differentiated again: a second-order gradient through the native
// info_nce is an error that names the way out, not a silent zero.
struct NceBwd : public Function<NceBwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gl, const Tensor& a, const Tensor& p,
                               const Tensor& logits, const Tensor& stats, double t, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [da, dp] = nce_bwd_op(gl, a, p, logits, stats, t, reduction);
    return {da, dp};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "the native info_nce is differentiable once; for higher-order gradients "
                       "use backend='reference'");
  }
};

std::tuple<Tensor, Tensor, Tensor> nce_fwd_autograd(const Tensor& a, const Tensor& p, double t, int64_t reduction) {
  auto r = NceFwd::apply(a, p, t, reduction);
  return {r[0], r[1], r[2]};
}

std::tuple<Tensor, Tensor> nce_bwd_autograd(const Tensor& gl, const Tensor& a, const Tensor& p, const Tensor& logits,
                                            const Tensor& stats, double t, int64_t reduction) {
  auto r = NceBwd::apply(gl, a, p, logits, stats, t, reduction);
  return {r[0], r[1]};
}

// Explicit negatives: the same pattern with a third differentiable input (anchor_index is data).
struct NceNegFwd : public Function<NceNegFwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& a, const Tensor& p, const Tensor& n,
                               const Tensor& index, double t, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, logits, stats, norms] = nce_neg_fwd_op(a, p, n, index, t, reduction);
    ctx->save_for_backward({a, p, n, logits, stats, norms});
    ctx->saved_data["t"] = t;
    ctx->saved_data["reduction"] = reduction;
    ctx->mark_non_differentiable({logits, stats, norms});
    return {loss, logits, stats, norms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    auto [da, dp, dn] = nce_neg_bwd_op(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], ctx->saved_data["t"].toDouble(),
                                       ctx->saved_data["reduction"].toInt());
    return {da, dp, dn, Tensor(), Tensor(), Tensor()};
  }
};

struct NceNegBwd : public Function<NceNegBwd> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gl, const Tensor& a, const Tensor& p,
                               const Tensor& n, const Tensor& logits, const Tensor& stats, const Tensor& norms,
                               double t, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [da, dp, dn] = nce_neg_bwd_op(gl, a, p, n, logits, stats, norms, t, reduction);
    return {da, dp, dn};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "the native info_nce (explicit negatives) is differentiable once; for higher-order "
                       "gradients use backend='reference'");
  }
};

NegFwdResult nce_neg_fwd_autograd(const Tensor& a, const Tensor& p, const Tensor& n, const Tensor& index, double t,
                                  int64_t reduction) {
  auto r = NceNegFwd::apply(a, p, n, index, t, reduction);
  return {r[0], r[1], r[2], r[3]};
}

NegBwdResult nce_neg_bwd_autograd(const Tensor& gl, const Tensor& a, const Tensor& p, const Tensor& n,
                                  const Tensor& logits, const Tensor& stats, const Tensor& norms, double t,
                                  int64_t reduction) {
  auto r = NceNegBwd::apply(gl, a, p, n, logits, stats, norms, t, reduction);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace cgc

TORCH_LIBRARY_IMPL(cgc, Autograd, m) {
  m.impl("gradcam_fwd", &cgc::gradcam_fwd_autograd);
  m.impl("gradcam_bwd", &cgc::gradcam_bwd_autograd);
  m.impl("affine_warp_fwd", &cgc::warp_fwd_autograd);
  m.impl("affine_warp_bwd", &cgc::warp_bwd_autograd);
  m.impl("info_nce_fwd", &cgc::nce_fwd_autograd);
  m.impl("info_nce_bwd", &cgc::nce_bwd_autograd);
  m.impl("info_nce_neg_fwd", &cgc::nce_neg_fwd_autograd);
  m.impl("info_nce_neg_bwd", &cgc::nce_neg_bwd_autograd);
}
