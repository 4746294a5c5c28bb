"""Affine bilinear warp kernels: ``F.grid_sample(x, F.affine_grid(theta, ...))`` with
``align_corners=False`` and zeros/border padding, without materialising the sampling grid.

Two families, chosen by input size (float64 always takes the general one):

- **General** (:func:`_warp_fwd_kernel`, :func:`_warp_bwd_kernel`; images): each program takes
  one batch row and a block of output pixels, computes their source coordinates from
  ``theta`` in registers (float64 for float64 inputs, else float32, as the reference does) and
  loops over the channels, which share the coordinates. The backward scatters
  ``gout * weight`` into the four source corners with atomic adds (few outputs share an
  input pixel of an image).
- **Small inputs**, at most 16 x 16 pixels (Grad-CAM heatmaps, where thousands of output
  pixels read each input pixel): linear algebra on one plane with ``tl.dot``. A pixel's
  bilinear weights are the outer product of its two y weights and its two x weights, held in
  the rows of ``Y`` [P, H] and ``X`` [P, W]. Maps without rotation or shear (every crop/flip
  of CGC) are separable: all pixels of an output row share ``Y``'s row and all of a column
  ``X``'s, so a tile of output is ``Y_rows @ (x @ X_cols^T)``
  (:func:`_warp_fwd_small_kernel`) and the backward reduces a block of rows along x first,
  ``Y_rows^T @ (G @ X_cols)`` (:func:`_warp_bwd_small_kernel`): a few multiply-adds per
  pixel. Other maps take the per-pixel formulas (forward) or add ``(Y g)^T @ X`` per block of
  pixels (backward). The backward writes each plane's gradient densely, without atomics, and
  adds the partial sums of a plane's slices in a fixed order: it is deterministic.

Both accumulate in float32 also for 16-bit inputs; the gradient is cast at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, acc_dtype, alert_nondeterministic, autotune, launch, plane_offset, sm_count, tl_dtype

_CONFIGS = [
    triton.Config({"BLOCK": 256}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=8),
    triton.Config({"BLOCK": 128}, num_warps=2),
]


@triton.jit
def _taps(theta_ptr, b, ps, pmask, w_out, h_out, H, W, BORDER: tl.constexpr, ACC: tl.constexpr):
    """Top-left source corner (x0, y0), fractional offsets (fx, fy) and the in-image masks of
    the taps of each axis (in_x0, in_x1, in_y0, in_y1; the y masks and-ed with ``pmask``) of
    output pixels ``ps`` of batch row ``b``: the output pixel center in normalized
    coordinates, mapped by ``theta`` and un-normalized to the input grid (pixel centers at
    integers)."""
    t = theta_ptr + b.to(tl.int64) * 6
    t00 = tl.load(t + 0)
    t01 = tl.load(t + 1)
    t02 = tl.load(t + 2)
    t10 = tl.load(t + 3)
    t11 = tl.load(t + 4)
    t12 = tl.load(t + 5)
    xs = (2.0 * (ps % w_out).to(ACC) + 1.0) / w_out - 1.0
    ys = (2.0 * (ps // w_out).to(ACC) + 1.0) / h_out - 1.0
    x = ((t00 * xs + t01 * ys + t02 + 1.0) * W - 1.0) / 2.0
    y = ((t10 * xs + t11 * ys + t12 + 1.0) * H - 1.0) / 2.0
    if BORDER:
        x = tl.minimum(tl.maximum(x, 0.0), W - 1.0)
        y = tl.minimum(tl.maximum(y, 0.0), H - 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    # far-away samples are clamped to just outside the image before the integer cast: they
    # stay outside (weight 0) and the cast cannot overflow
    x0 = tl.minimum(tl.maximum(x0f, -2.0), W * 1.0).to(tl.int32)
    y0 = tl.minimum(tl.maximum(y0f, -2.0), H * 1.0).to(tl.int32)
    in_x0 = (x0 >= 0) & (x0 < W)
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    in_y0 = pmask & (y0 >= 0) & (y0 < H)
    in_y1 = pmask & (y0 + 1 >= 0) & (y0 + 1 < H)
    return x0, y0, x - x0f, y - y0f, in_x0, in_x1, in_y0, in_y1


@triton.jit
def _corners(theta_ptr, b, ps, pmask, w_out, h_out, H, W, BORDER: tl.constexpr, ACC: tl.constexpr):
    """:func:`_taps` with the in-image masks of the four corners (m00, m01, m10, m11; row then
    column) instead of the per-axis ones."""
    x0, y0, fx, fy, in_x0, in_x1, in_y0, in_y1 = _taps(theta_ptr, b, ps, pmask, w_out, h_out, H, W, BORDER, ACC)
    return x0, y0, fx, fy, in_y0 & in_x0, in_y0 & in_x1, in_y1 & in_x0, in_y1 & in_x1


@triton.jit
def _sample(plane, x0, y0, fx, fy, m00, m01, m10, m11, sh, sw, ACC: tl.constexpr):
    """Bilinear value of one input plane (``plane`` points at it; strides ``sh``, ``sw``) at
    the corners and offsets of :func:`_corners`, masked corners reading zero."""
    r0 = y0.to(tl.int64) * sh
    r1 = (y0 + 1).to(tl.int64) * sh
    c0 = x0.to(tl.int64) * sw
    c1 = (x0 + 1).to(tl.int64) * sw
    v = (1.0 - fy) * (1.0 - fx) * tl.load(plane + r0 + c0, mask=m00, other=0.0).to(ACC)
    v += (1.0 - fy) * fx * tl.load(plane + r0 + c1, mask=m01, other=0.0).to(ACC)
    v += fy * (1.0 - fx) * tl.load(plane + r1 + c0, mask=m10, other=0.0).to(ACC)
    v += fy * fx * tl.load(plane + r1 + c1, mask=m11, other=0.0).to(ACC)
    return v


@autotune(_CONFIGS, key=["HW_OUT", "C"])
@triton.jit
def _warp_fwd_kernel(
    x_ptr,
    theta_ptr,
    out_ptr,
    C,
    H,
    W,
    h_out,
    w_out,
    HW_OUT,
    sxb,
    sxc,
    sxh,
    sxw,
    BORDER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out[b, c, p] = sum over the 4 corners of weight * x[b, c, corner]`` (contiguous out)."""
    b = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pmask = ps < HW_OUT
    x0, y0, fx, fy, m00, m01, m10, m11 = _corners(theta_ptr, b, ps, pmask, w_out, h_out, H, W, BORDER, ACC)
    for c in range(0, C):
        plane = x_ptr + b.to(tl.int64) * sxb + (b * 0 + c).to(tl.int64) * sxc
        v = _sample(plane, x0, y0, fx, fy, m00, m01, m10, m11, sxh, sxw, ACC)
        dst = (b.to(tl.int64) * C + c) * HW_OUT + ps
        tl.store(out_ptr + dst, v.to(out_ptr.dtype.element_ty), mask=pmask)


@autotune(_CONFIGS, key=["HW_OUT", "C"], reset_to_zero=["gin_ptr"])
@triton.jit
def _warp_bwd_kernel(
    gout_ptr,
    theta_ptr,
    gin_ptr,
    C,
    H,
    W,
    h_out,
    w_out,
    HW_OUT,
    sgb,
    sgc,
    sgh,
    sgw,
    BORDER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``gin[b, c, corner] += weight * gout[b, c, p]`` by atomic adds (``gin`` contiguous,
    zero-initialized, accumulation dtype)."""
    b = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    pmask = ps < HW_OUT
    x0, y0, fx, fy, m00, m01, m10, m11 = _corners(theta_ptr, b, ps, pmask, w_out, h_out, H, W, BORDER, ACC)
    x1 = x0 + 1
    y1 = y0 + 1
    g_sp = gout_ptr + plane_offset(b, ps // w_out, ps % w_out, sgb, sgh, sgw)
    for c in range(0, C):
        g = tl.load(g_sp + (b * 0 + c).to(tl.int64) * sgc, mask=pmask, other=0.0).to(ACC)
        base = (b.to(tl.int64) * C + c) * H * W
        r0 = base + y0.to(tl.int64) * W
        r1 = base + y1.to(tl.int64) * W
        tl.atomic_add(gin_ptr + r0 + x0, g * (1.0 - fy) * (1.0 - fx), mask=m00)
        tl.atomic_add(gin_ptr + r0 + x1, g * (1.0 - fy) * fx, mask=m01)
        tl.atomic_add(gin_ptr + r1 + x0, g * fy * (1.0 - fx), mask=m10)
        tl.atomic_add(gin_ptr + r1 + x1, g * fy * fx, mask=m11)


_SMALL_CONFIGS = [
    triton.Config({"BLOCK": 128, "BH": 16, "BW": 128}, num_warps=4),
    triton.Config({"BLOCK": 64, "BH": 32, "BW": 64}, num_warps=4),
    triton.Config({"BLOCK": 256, "BH": 32, "BW": 128}, num_warps=8),
]
SMALL_INPUT = 16  # inputs up to this many pixels a side take the small-input kernels


@triton.jit
def _axis_weights(idx, i0, frac, in0, in1):
    """[P, N] linear-interpolation weights of P samples on an axis of N (``idx`` = the row
    ``arange(N)[None, :]``): ``1 - frac`` at tap ``i0`` and ``frac`` at ``i0 + 1``, where those
    taps are inside the input (``in0``, ``in1``), zero elsewhere."""
    return tl.where((idx == i0[:, None]) & in0[:, None], (1.0 - frac)[:, None], 0.0) + tl.where(
        (idx == i0[:, None] + 1) & in1[:, None], frac[:, None], 0.0
    )


@autotune(_SMALL_CONFIGS, key=["h_out", "w_out", "HP", "WP"])
@triton.jit
def _warp_bwd_small_kernel(
    gout_ptr,
    theta_ptr,
    part_ptr,
    C,
    H,
    W,
    h_out,
    w_out,
    SPLIT,
    sgb,
    sgc,
    sgh,
    sgw,
    BORDER: tl.constexpr,
    ACC: tl.constexpr,
    HP: tl.constexpr,
    WP: tl.constexpr,
    BLOCK: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """``part[plane, slice] = sum_p g_p outer(wy_p, wx_p)`` [HP, WP] over the output rows of
    slice ``pid 1`` (of ``SPLIT``) of plane ``pid 0`` (= b * C + c)."""
    plane = tl.program_id(0)
    b = plane // C
    c = plane % C
    per = tl.cdiv(h_out, SPLIT)
    r_lo = tl.program_id(1) * per
    r_hi = tl.minimum(h_out, r_lo + per)
    iy = tl.arange(0, HP)[None, :]
    ix = tl.arange(0, WP)[None, :]
    g_plane = gout_ptr + b.to(tl.int64) * sgb + c.to(tl.int64) * sgc
    t = theta_ptr + b.to(tl.int64) * 6
    acc = tl.zeros([HP, WP], dtype=ACC)
    if (tl.load(t + 1) == 0.0) & (tl.load(t + 3) == 0.0):
        # separable: x taps depend on the column only, y taps on the row only
        for r0 in range(r_lo, r_hi, BH):
            rows = r0 + tl.arange(0, BH)
            rmask = rows < r_hi
            along_x = tl.zeros([BH, WP], dtype=ACC)
            for c0 in range(0, w_out, BW):
                cols = c0 + tl.arange(0, BW)
                cmask = cols < w_out
                x0, _, fx, _, in_x0, in_x1, _, _ = _taps(theta_ptr, b, cols, cmask, w_out, h_out, H, W, BORDER, ACC)
                xs = _axis_weights(ix, x0, fx, in_x0, in_x1)
                g = tl.load(
                    g_plane + rows.to(tl.int64)[:, None] * sgh + cols.to(tl.int64)[None, :] * sgw,
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                ).to(ACC)
                along_x = tl.dot(g, xs, along_x, input_precision="ieee")
            _, y0, _, fy, _, _, in_y0, in_y1 = _taps(theta_ptr, b, rows * w_out, rmask, w_out, h_out, H, W, BORDER, ACC)
            ys = _axis_weights(iy, y0, fy, in_y0, in_y1)
            acc = tl.dot(tl.trans(ys), along_x, acc, input_precision="ieee")
    else:
        # general: per pixel, its y weights (times g) and x weights
        for p0 in range(r_lo * w_out, r_hi * w_out, BLOCK):
            ps = p0 + tl.arange(0, BLOCK)
            pmask = ps < r_hi * w_out
            x0, y0, fx, fy, in_x0, in_x1, in_y0, in_y1 = _taps(theta_ptr, b, ps, pmask, w_out, h_out, H, W, BORDER, ACC)
            g = tl.load(
                g_plane + (ps // w_out).to(tl.int64) * sgh + (ps % w_out).to(tl.int64) * sgw, mask=pmask, other=0.0
            ).to(ACC)
            ys = _axis_weights(iy, y0, fy, in_y0, in_y1) * g[:, None]
            xs = _axis_weights(ix, x0, fx, in_x0, in_x1)
            acc = tl.dot(tl.trans(ys), xs, acc, input_precision="ieee")
    part = part_ptr + (plane.to(tl.int64) * SPLIT + tl.program_id(1)) * (HP * WP)
    tl.store(part + tl.arange(0, HP)[:, None] * WP + ix, acc)


@autotune(_SMALL_CONFIGS, key=["h_out", "w_out", "HP", "WP"])
@triton.jit
def _warp_fwd_small_kernel(
    x_ptr,
    theta_ptr,
    out_ptr,
    C,
    H,
    W,
    h_out,
    w_out,
    sxb,
    sxc,
    sxh,
    sxw,
    BORDER: tl.constexpr,
    ACC: tl.constexpr,
    HP: tl.constexpr,
    WP: tl.constexpr,
    BLOCK: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Output tile (row block ``pid 1``, column block ``pid 2``) of plane ``pid 0`` (= b * C + c)
    of a small input (contiguous ``out``)."""
    plane = tl.program_id(0)
    b = plane // C
    c = plane % C
    rows = tl.program_id(1) * BH + tl.arange(0, BH)
    cols = tl.program_id(2) * BW + tl.arange(0, BW)
    rmask = rows < h_out
    cmask = cols < w_out
    x_plane = x_ptr + b.to(tl.int64) * sxb + c.to(tl.int64) * sxc
    t = theta_ptr + b.to(tl.int64) * 6
    if (tl.load(t + 1) == 0.0) & (tl.load(t + 3) == 0.0):
        # separable: Y_rows @ (x @ X_cols^T)
        iy = tl.arange(0, HP)
        ix = tl.arange(0, WP)
        src = tl.load(
            x_plane + iy.to(tl.int64)[:, None] * sxh + ix.to(tl.int64)[None, :] * sxw,
            mask=(iy < H)[:, None] & (ix < W)[None, :],
            other=0.0,
        ).to(ACC)
        x0, _, fx, _, in_x0, in_x1, _, _ = _taps(theta_ptr, b, cols, cmask, w_out, h_out, H, W, BORDER, ACC)
        _, y0, _, fy, _, _, in_y0, in_y1 = _taps(theta_ptr, b, rows * w_out, rmask, w_out, h_out, H, W, BORDER, ACC)
        along_x = tl.dot(src, tl.trans(_axis_weights(ix[None, :], x0, fx, in_x0, in_x1)), input_precision="ieee")
        v = tl.dot(_axis_weights(iy[None, :], y0, fy, in_y0, in_y1), along_x, input_precision="ieee")
    else:
        # general: the four corners of every pixel of the tile
        ps = rows[:, None] * w_out + cols[None, :]
        x0, y0, fx, fy, m00, m01, m10, m11 = _corners(
            theta_ptr, b, ps, rmask[:, None] & cmask[None, :], w_out, h_out, H, W, BORDER, ACC
        )
        v = _sample(x_plane, x0, y0, fx, fy, m00, m01, m10, m11, sxh, sxw, ACC)
    dst = out_ptr + plane.to(tl.int64) * h_out * w_out + rows[:, None] * w_out + cols[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _small(H: int, W: int, dtype: torch.dtype):
    """``(HP, WP)``, the padded plane of the small-input kernels, or None when the input is too
    large for them (or float64, which the general kernels compute)."""
    if max(H, W) > SMALL_INPUT or acc_dtype(dtype) != torch.float32:
        return None
    return tuple(max(16, triton.next_power_of_2(n)) for n in (H, W))


def _slices(planes: int, h_out: int, w_out: int, device: torch.device) -> int:
    """Row slices of each plane's output for the dense backward: enough programs for about four
    per SM, each with at least 1024 pixels; two under the interpreter, so that the tests add
    partial sums too."""
    if INTERPRETED or device.type != "cuda":
        return min(2, h_out)
    return max(1, min(h_out, triton.cdiv(h_out * w_out, 1024), triton.cdiv(4 * sm_count(device), planes)))


def _theta(theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """theta as a contiguous [B, 6] tensor of the coordinate dtype (float64 for float64
    inputs, else float32, like the reference)."""
    return theta.to(acc_dtype(dtype)).reshape(theta.shape[0], 6).contiguous()


def warp_forward(input: torch.Tensor, theta: torch.Tensor, h_out: int, w_out: int, border: bool) -> torch.Tensor:
    """Warped ``input`` [B,C,H,W] -> [B,C,h_out,w_out] in the input dtype."""
    B, C, H, W = input.shape
    out = torch.empty((B, C, h_out, w_out), dtype=input.dtype, device=input.device)
    small = _small(H, W, input.dtype)
    if small is not None:
        launch(_warp_fwd_small_kernel)[
            lambda meta: (B * C, triton.cdiv(h_out, meta["BH"]), triton.cdiv(w_out, meta["BW"]))
        ](
            input,
            _theta(theta, input.dtype),
            out,
            C,
            H,
            W,
            h_out,
            w_out,
            *input.stride(),
            BORDER=border,
            ACC=tl.float32,
            HP=small[0],
            WP=small[1],
        )
        return out
    hw = h_out * w_out
    launch(_warp_fwd_kernel)[lambda meta: (B, triton.cdiv(hw, meta["BLOCK"]))](
        input,
        _theta(theta, input.dtype),
        out,
        C,
        H,
        W,
        h_out,
        w_out,
        hw,
        *input.stride(),
        BORDER=border,
        ACC=tl_dtype(acc_dtype(input.dtype)),
    )
    return out


def warp_backward(
    grad_out: torch.Tensor, theta: torch.Tensor, H: int, W: int, border: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient [B,C,H,W] (in ``dtype``) of :func:`warp_forward` for ``grad_out`` [B,C,h,w]."""
    B, C, h_out, w_out = grad_out.shape
    acc = acc_dtype(dtype)
    hw = h_out * w_out
    small = _small(H, W, dtype)
    if small is not None:
        split = _slices(B * C, h_out, w_out, grad_out.device)
        part = torch.empty((B * C, split, *small), dtype=acc, device=grad_out.device)
        launch(_warp_bwd_small_kernel)[(B * C, split)](
            grad_out,
            _theta(theta, dtype),
            part,
            C,
            H,
            W,
            h_out,
            w_out,
            split,
            *grad_out.stride(),
            BORDER=border,
            ACC=tl.float32,
            HP=small[0],
            WP=small[1],
        )
        return part.sum(1)[:, :H, :W].reshape(B, C, H, W).to(dtype)
    alert_nondeterministic("the Triton affine_warp backward", grad_out.device)
    grad_in = torch.zeros((B, C, H, W), dtype=acc, device=grad_out.device)
    launch(_warp_bwd_kernel)[lambda meta: (B, triton.cdiv(hw, meta["BLOCK"]))](
        grad_out,
        _theta(theta, dtype),
        grad_in,
        C,
        H,
        W,
        h_out,
        w_out,
        hw,
        *grad_out.stride(),
        BORDER=border,
        ACC=tl_dtype(acc),
    )
    return grad_in.to(dtype)
