// Shared declarations of the cgc extension: argument checks used by every kernel and the
// integer codes of the enum-like arguments (the schemas are in cgc.cpp).
#pragma once

#include <ATen/ATen.h>

namespace cgc {

// affine_warp padding_mode codes (cgc.ops.native maps the strings to these).
constexpr int64_t kPadZeros = 0;
constexpr int64_t kPadBorder = 1;

// info_nce reduction codes.
constexpr int64_t kReduceNone = 0;
constexpr int64_t kReduceMean = 1;
constexpr int64_t kReduceSum = 2;

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* names) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", names, " are on different devices (", a.device(),
              " vs ", b.device(), ")");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", names, " have different dtypes (",
              a.scalar_type(), " vs ", b.scalar_type(), ")");
}

// gradcam_fwd/bwd: activations [B,K,H,W]; gradients [B,K,H,W] or weights [B,K].
inline void check_gradcam(const at::Tensor& A, const at::Tensor& G, const char* op) {
  TORCH_CHECK(A.dim() == 4, op, ": activations must be [B,K,H,W], got ", A.sizes());
  TORCH_CHECK(A.numel() > 0, op, ": activations are empty (", A.sizes(), ")");
  check_float(A, op, "activations");
  check_same(A, G, op, "activations and gradients");
  if (G.dim() == 4) {
    TORCH_CHECK(G.sizes() == A.sizes(), op, ": gradients ", G.sizes(), " do not match activations ",
                A.sizes());
  } else {
    TORCH_CHECK(G.dim() == 2 && G.size(0) == A.size(0) && G.size(1) == A.size(1), op,
                ": gradients must be [B,K,H,W] or weights [B,K] matching activations ", A.sizes(),
                ", got ", G.sizes());
  }
}

// gradcam_bwd: grad_out and out are [B,H,W] maps of the activations' batch and size.
inline void check_gradcam_map(const at::Tensor& M, const at::Tensor& A, const char* op, const char* name) {
  TORCH_CHECK(M.dim() == 3 && M.size(0) == A.size(0) && M.size(1) == A.size(2) && M.size(2) == A.size(3),
              op, ": ", name, " must be [B,H,W] = [", A.size(0), ",", A.size(2), ",", A.size(3), "], got ",
              M.sizes());
  check_same(M, A, op, (std::string(name) + " and activations").c_str());
}

inline void check_theta(const at::Tensor& theta, int64_t batch, const at::Tensor& x, const char* op) {
  TORCH_CHECK(theta.dim() == 3 && theta.size(0) == batch && theta.size(1) == 2 && theta.size(2) == 3, op,
              ": theta must be [B,2,3] with B = ", batch, ", got ", theta.sizes());
  check_float(theta, op, "theta");
  TORCH_CHECK(theta.device() == x.device(), op, ": theta is on ", theta.device(), ", the input on ",
              x.device());
}

inline void check_warp(const at::Tensor& x, const at::Tensor& theta, int64_t h, int64_t w, int64_t padding,
                       const char* op) {
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0, op, ": input must be a non-empty [B,C,H,W] tensor, got ",
              x.sizes());
  check_float(x, op, "input");
  check_theta(theta, x.size(0), x, op);
  TORCH_CHECK(h > 0 && w > 0, op, ": sizes must be positive, got (", h, ", ", w, ")");
  TORCH_CHECK(padding == kPadZeros || padding == kPadBorder, op,
              ": padding_mode must be 0 (zeros) or 1 (border), got ", padding);
}

inline void check_nce(const at::Tensor& a, const at::Tensor& p, double temperature, int64_t reduction,
                      const char* op) {
  TORCH_CHECK(a.dim() == 2 && a.numel() > 0, op, ": anchors must be a non-empty [B,D] tensor, got ",
              a.sizes());
  TORCH_CHECK(a.sizes() == p.sizes(), op, ": anchors ", a.sizes(), " and positives ", p.sizes(),
              " must have the same shape");
  TORCH_CHECK(a.size(0) >= 2, op, ": needs a batch of at least 2, got B=", a.size(0));
  check_float(a, op, "anchors");
  check_same(a, p, op, "anchors and positives");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// info_nce_neg_fwd/bwd: anchors and positives [b,D], negatives [N,D] of the same dtype and device.
inline void check_nce_neg(const at::Tensor& a, const at::Tensor& p, const at::Tensor& n, double temperature,
                          int64_t reduction, const char* op) {
  TORCH_CHECK(a.dim() == 2 && a.numel() > 0, op, ": anchors must be a non-empty [b,D] tensor, got ",
              a.sizes());
  TORCH_CHECK(a.sizes() == p.sizes(), op, ": anchors ", a.sizes(), " and positives ", p.sizes(),
              " must have the same shape");
  TORCH_CHECK(n.dim() == 2 && n.size(0) > 0 && n.size(1) == a.size(1), op,
              ": negatives must be a non-empty [N,D] tensor with the anchors' D = ", a.size(1), ", got ",
              n.sizes());
  check_float(a, op, "anchors");
  check_same(a, p, op, "anchors and positives");
  check_same(a, n, op, "anchors and negatives");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// info_nce_neg_fwd's anchor_index: int64 [b] on the anchors' device. Its values are checked by
// cgc.ops.info_nce (and by the CPU kernel); the kernels only ever compare them with column
// numbers, never address memory with them.
inline void check_anchor_index(const at::Tensor& index, const at::Tensor& a, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == a.size(0), op,
              ": anchor_index must be an int64 tensor [b] = [", a.size(0), "], got ", index.scalar_type(), " ",
              index.sizes());
  TORCH_CHECK(index.device() == a.device(), op, ": anchor_index is on ", index.device(), ", the anchors on ",
              a.device());
}

// info_nce saved tensors, float64 whatever the input dtype: logits [B,B] (diagonal = the positive
// logit) and stats [3,B] (|a_b|, |p_b|, row log-sum-exp); info_nce_neg saves logits [b,1+N]
// (column 0 the positive, then the negatives, -inf in each row's excluded column), the same stats
// [3,b] and the negatives' norms [N]. The B x B (b x N) bookkeeping and the per-element gradient
// coefficients run in double: the gradient is a difference of nearly equal terms (it vanishes
// exactly for collinear rows, e.g. D = 1), so float32 arithmetic there would leave rounding noise
// of the order of 1e-7 / T on a zero gradient.
constexpr double kEpsNorm = 1e-12;  // the reference's clamp of the norms (as F.normalize)

// Grain of at::parallel_for in tasks of `work` elements each: small inputs run inline on the
// calling thread (a parallel region costs more than it saves below ~32K elements).
inline int64_t grain(int64_t work) {
  constexpr int64_t kMinWork = 32768;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(work, 1));
}

}  // namespace cgc
