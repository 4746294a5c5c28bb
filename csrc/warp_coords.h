// Source coordinates of the affine warp, shared by the CPU and CUDA kernels so that both
// evaluate exactly the reference's arithmetic (cgc/ops/reference.py::_source_coords).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CGC_HD __host__ __device__ __forceinline__
#else
#define CGC_HD inline
#endif

namespace cgc {

// Normalized center of output pixel i of n (align_corners=False): (2i + 1) / n - 1.
template <typename T>
CGC_HD T norm_centre(int64_t i, int64_t n) {
  return (T(2) * static_cast<T>(i) + T(1)) / static_cast<T>(n) - T(1);
}

// Input pixel coordinate (pixel centers at integers) of normalized coordinate g on an axis of
// `size` pixels; border padding clamps it to the image.
template <typename T>
CGC_HD T unnormalize(T g, int64_t size, bool border) {
  T v = ((g + T(1)) * static_cast<T>(size) - T(1)) / T(2);
  if (border) v = v < T(0) ? T(0) : (v > static_cast<T>(size - 1) ? static_cast<T>(size - 1) : v);
  return v;
}

// The two taps of linear interpolation at coordinate v on an axis of `size` pixels: indices
// clamped into the axis and weights that are zero for taps outside it (zeros padding).
template <typename T>
struct Taps {
  int64_t i0, i1;
  T w0, w1;
};

template <typename T>
CGC_HD Taps<T> taps(T v, int64_t size) {
  // far outside the axis both taps are zero anyway; clamping keeps the int64 cast defined
  if (v < T(-2)) v = T(-2);
  if (v > static_cast<T>(size + 1)) v = static_cast<T>(size + 1);
  const T f = ::floor(v);
  const int64_t i = static_cast<int64_t>(f);
  const T frac = v - f;
  Taps<T> t;
  const bool in0 = i >= 0 && i < size, in1 = i + 1 >= 0 && i + 1 < size;
  t.w0 = in0 ? T(1) - frac : T(0);
  t.w1 = in1 ? frac : T(0);
  t.i0 = i < 0 ? 0 : (i >= size ? size - 1 : i);
  t.i1 = i + 1 < 0 ? 0 : (i + 1 >= size ? size - 1 : i + 1);
  return t;
}

}  // namespace cgc
