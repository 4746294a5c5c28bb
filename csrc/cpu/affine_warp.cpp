// Affine bilinear warp on the CPU, without a materialised sampling grid.
//
// Maps without rotation or shear (theta[0][1] == theta[1][0] == 0: every crop/flip/resize of
// CGC) are separable: each output column reads the same two input columns with the same
// weights in every row, and likewise for rows. Those planes are resampled in two passes
// (along x into a small row buffer, then along y as contiguous, vectorisable row blends), and
// their backward runs the same two passes transposed. Other maps take the general path: four
// taps per output pixel, and a scatter-add per plane for the backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../cgc.h"
#include "../warp_coords.h"

namespace cgc {
namespace {

// theta of one batch row in the coordinate dtype.
template <typename coord_t>
struct Affine {
  coord_t t[6];
  bool separable() const { return t[1] == coord_t(0) && t[3] == coord_t(0); }
};

// Taps of every output column (x) or row (y) of a separable map; rows whose two weights are
// both zero are flagged so that the passes skip them.
template <typename coord_t>
void axis_taps(const Affine<coord_t>& th, bool x_axis, int64_t out_n, int64_t in_n, bool border,
               std::vector<Taps<coord_t>>& taps_out) {
  taps_out.resize(out_n);
  const coord_t a = x_axis ? th.t[0] : th.t[4], c = x_axis ? th.t[2] : th.t[5];
  for (int64_t i = 0; i < out_n; ++i) {
    const coord_t g = a * norm_centre<coord_t>(i, out_n) + c;  // the other axis' term is 0
    taps_out[i] = taps(unnormalize(g, in_n, border), in_n);
  }
}

// Input rows [lo, hi] that rows with a non-zero weight read (lo > hi when none).
template <typename coord_t>
void row_range(const std::vector<Taps<coord_t>>& ty, int64_t& lo, int64_t& hi) {
  lo = INT64_MAX;
  hi = -1;
  for (const auto& t : ty) {
    if (t.w0 != coord_t(0)) lo = std::min(lo, t.i0), hi = std::max(hi, t.i0);
    if (t.w1 != coord_t(0)) lo = std::min(lo, t.i1), hi = std::max(hi, t.i1);
  }
}

template <typename scalar_t, typename coord_t>
std::vector<Affine<coord_t>> read_theta(const at::Tensor& theta) {
  const at::Tensor th = theta.to(c10::CppTypeToScalarType<coord_t>::value).contiguous();
  const coord_t* p = th.const_data_ptr<coord_t>();
  std::vector<Affine<coord_t>> out(th.size(0));
  for (int64_t b = 0; b < th.size(0); ++b)
    for (int j = 0; j < 6; ++j) out[b].t[j] = p[b * 6 + j];
  return out;
}

template <typename scalar_t>
void warp_fwd_kernel(const at::Tensor& x, const at::Tensor& theta, at::Tensor& out, bool border) {
  using acc_t = at::opmath_type<scalar_t>;
  using coord_t = acc_t;  // float64 coordinates for float64 input, float32 otherwise (as the reference)
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = out.size(2), w = out.size(3);
  const auto th = read_theta<scalar_t, coord_t>(theta);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  int64_t separable = 0;
  for (const auto& a : th) separable += a.separable();
  // separable rows: two passes per (b, c) plane
  if (separable > 0) at::parallel_for(0, B * C, grain(2 * h * w), [&](int64_t p0, int64_t p1) {
    std::vector<Taps<coord_t>> tx, ty;
    std::vector<acc_t> rows;
    for (int64_t pl = p0; pl < p1; ++pl) {
      const int64_t b = pl / C;
      if (!th[b].separable()) continue;
      axis_taps(th[b], true, w, W, border, tx);
      axis_taps(th[b], false, h, H, border, ty);
      int64_t lo, hi;
      row_range(ty, lo, hi);
      const scalar_t* src = in + pl * H * W;
      scalar_t* dst = o + pl * h * w;
      rows.resize(std::max<int64_t>(hi - lo + 1, 0) * w);
      for (int64_t y = lo; y <= hi; ++y) {
        const scalar_t* r = src + y * W;
        acc_t* t = rows.data() + (y - lo) * w;
        for (int64_t i = 0; i < w; ++i)
          t[i] = static_cast<acc_t>(r[tx[i].i0]) * tx[i].w0 + static_cast<acc_t>(r[tx[i].i1]) * tx[i].w1;
      }
      for (int64_t oy = 0; oy < h; ++oy) {
        const Taps<coord_t>& t = ty[oy];
        scalar_t* d = dst + oy * w;
        const bool u0 = t.w0 != coord_t(0), u1 = t.w1 != coord_t(0);
        const acc_t* r0 = rows.data() + (u0 ? t.i0 - lo : 0) * w;
        const acc_t* r1 = rows.data() + (u1 ? t.i1 - lo : 0) * w;
        if (u0 && u1) {
          for (int64_t i = 0; i < w; ++i) d[i] = static_cast<scalar_t>(r0[i] * t.w0 + r1[i] * t.w1);
        } else if (u0 || u1) {
          const acc_t* r = u0 ? r0 : r1;
          const acc_t wt = u0 ? t.w0 : t.w1;
          for (int64_t i = 0; i < w; ++i) d[i] = static_cast<scalar_t>(r[i] * wt);
        } else {
          for (int64_t i = 0; i < w; ++i) d[i] = scalar_t(0);
        }
      }
    }
  });
  // general rows: four taps per output pixel, the tap positions shared by all channels
  if (separable < B) at::parallel_for(0, B * h, grain(8 * w * C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / h, oy = r % h;
      const Affine<coord_t>& a = th[b];
      if (a.separable()) continue;
      const coord_t ys = norm_centre<coord_t>(oy, h);
      for (int64_t ox = 0; ox < w; ++ox) {
        const coord_t xs = norm_centre<coord_t>(ox, w);
        const Taps<coord_t> tx = taps(unnormalize(a.t[0] * xs + a.t[1] * ys + a.t[2], W, border), W);
        const Taps<coord_t> ty = taps(unnormalize(a.t[3] * xs + a.t[4] * ys + a.t[5], H, border), H);
        const acc_t w00 = ty.w0 * tx.w0, w01 = ty.w0 * tx.w1, w10 = ty.w1 * tx.w0, w11 = ty.w1 * tx.w1;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = in + (b * C + c) * H * W;
          const acc_t v = static_cast<acc_t>(src[ty.i0 * W + tx.i0]) * w00 +
                          static_cast<acc_t>(src[ty.i0 * W + tx.i1]) * w01 +
                          static_cast<acc_t>(src[ty.i1 * W + tx.i0]) * w10 +
                          static_cast<acc_t>(src[ty.i1 * W + tx.i1]) * w11;
          o[((b * C + c) * h + oy) * w + ox] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

template <typename scalar_t>
void warp_bwd_kernel(const at::Tensor& go, const at::Tensor& theta, at::Tensor& gin, bool border) {
  using acc_t = at::opmath_type<scalar_t>;
  using coord_t = acc_t;
  const int64_t B = go.size(0), C = go.size(1), h = go.size(2), w = go.size(3);
  const int64_t H = gin.size(2), W = gin.size(3);
  const auto th = read_theta<scalar_t, coord_t>(theta);
  const scalar_t* g = go.const_data_ptr<scalar_t>();
  scalar_t* gi = gin.data_ptr<scalar_t>();
  // one (b, c) plane per task: the scatter-add targets of a plane belong to that task only
  at::parallel_for(0, B * C, grain(2 * h * w + H * W), [&](int64_t p0, int64_t p1) {
    std::vector<Taps<coord_t>> tx, ty;
    std::vector<acc_t> rows, acc(H * W);
    for (int64_t pl = p0; pl < p1; ++pl) {
      const Affine<coord_t>& a = th[pl / C];
      const scalar_t* src = g + pl * h * w;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (a.separable()) {
        axis_taps(a, true, w, W, border, tx);
        axis_taps(a, false, h, H, border, ty);
        int64_t lo, hi;
        row_range(ty, lo, hi);
        const int64_t n = std::max<int64_t>(hi - lo + 1, 0);
        rows.assign(n * w, acc_t(0));
        // transpose of the y pass: spread each output row over its two input rows
        for (int64_t oy = 0; oy < h; ++oy) {
          const Taps<coord_t>& t = ty[oy];
          const scalar_t* r = src + oy * w;
          if (t.w0 != coord_t(0)) {
            acc_t* d = rows.data() + (t.i0 - lo) * w;
            for (int64_t i = 0; i < w; ++i) d[i] += static_cast<acc_t>(r[i]) * t.w0;
          }
          if (t.w1 != coord_t(0)) {
            acc_t* d = rows.data() + (t.i1 - lo) * w;
            for (int64_t i = 0; i < w; ++i) d[i] += static_cast<acc_t>(r[i]) * t.w1;
          }
        }
        // transpose of the x pass
        for (int64_t y = lo; y <= hi; ++y) {
          const acc_t* r = rows.data() + (y - lo) * w;
          acc_t* d = acc.data() + y * W;
          for (int64_t i = 0; i < w; ++i) {
            d[tx[i].i0] += r[i] * tx[i].w0;
            d[tx[i].i1] += r[i] * tx[i].w1;
          }
        }
      } else {
        for (int64_t oy = 0; oy < h; ++oy) {
          const coord_t ys = norm_centre<coord_t>(oy, h);
          for (int64_t ox = 0; ox < w; ++ox) {
            const coord_t xs = norm_centre<coord_t>(ox, w);
            const Taps<coord_t> tx1 = taps(unnormalize(a.t[0] * xs + a.t[1] * ys + a.t[2], W, border), W);
            const Taps<coord_t> ty1 = taps(unnormalize(a.t[3] * xs + a.t[4] * ys + a.t[5], H, border), H);
            const acc_t v = static_cast<acc_t>(src[oy * w + ox]);
            acc[ty1.i0 * W + tx1.i0] += v * (ty1.w0 * tx1.w0);
            acc[ty1.i0 * W + tx1.i1] += v * (ty1.w0 * tx1.w1);
            acc[ty1.i1 * W + tx1.i0] += v * (ty1.w1 * tx1.w0);
            acc[ty1.i1 * W + tx1.i1] += v * (ty1.w1 * tx1.w1);
          }
        }
      }
      scalar_t* dst = gi + pl * H * W;
      for (int64_t i = 0; i < H * W; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

at::Tensor affine_warp_fwd_cpu(const at::Tensor& input, const at::Tensor& theta, int64_t out_h, int64_t out_w,
                               int64_t padding_mode) {
  check_warp(input, theta, out_h, out_w, padding_mode, "affine_warp_fwd");
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_warp_fwd_cpu", [&] {
    warp_fwd_kernel<scalar_t>(x, theta, out, padding_mode == kPadBorder);
  });
  return out;
}

at::Tensor affine_warp_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& theta, int64_t in_h, int64_t in_w,
                               int64_t padding_mode) {
  check_warp(grad_out, theta, in_h, in_w, padding_mode, "affine_warp_bwd");
  const at::Tensor go = grad_out.contiguous();
  at::Tensor gin = at::empty({go.size(0), go.size(1), in_h, in_w}, go.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "affine_warp_bwd_cpu", [&] {
    warp_bwd_kernel<scalar_t>(go, theta, gin, padding_mode == kPadBorder);
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(cgc, CPU, m) {
  m.impl("affine_warp_fwd", &affine_warp_fwd_cpu);
  m.impl("affine_warp_bwd", &affine_warp_bwd_cpu);
}

}  // namespace cgc
