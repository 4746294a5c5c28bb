"""Grad-CAM kernels: ``cam[b,p] = relu(sum_k w[b,k,p] * A[b,k,p])`` and its backward.

``w`` is the elementwise gradient ``G`` (``pool=False``), or per-channel weights broadcast
over space: the spatial mean of ``G`` (``pool=True``, pooled by :func:`_pool_kernel` first)
or weights given as ``[B, K]``. Pixels ``p`` run over ``H*W``; inputs are read through
their strides (channels-last activations and expanded gradients need no copy).

Forward: one fused pass over ``K`` per pixel block (channel reduction + ReLU).
Backward: the same pass recomputes the ReLU mask and stores ``gm = gout * (s > 0)`` in the
accumulation dtype, then :func:`_elementwise_grad_kernel` (``dA = G*gm``, ``dG = A*gm``) or
:func:`_weighted_grad_kernel` (``dA = w*gm``, ``dw = sum_p A*gm``, spread over space as
``dw/HW`` when pooled) finishes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_dtype, autotune, launch, plane_offset, tl_dtype

_CONFIGS = [
    triton.Config({"BLOCK_K": 32, "BLOCK_P": 64}, num_warps=4),
    triton.Config({"BLOCK_K": 16, "BLOCK_P": 128}, num_warps=4),
    triton.Config({"BLOCK_K": 64, "BLOCK_P": 32}, num_warps=4),
    triton.Config({"BLOCK_K": 8, "BLOCK_P": 256}, num_warps=8),
    # 7x7 maps: small pixel blocks give B * 4 programs instead of B, enough to fill a GPU
    triton.Config({"BLOCK_K": 128, "BLOCK_P": 16}, num_warps=4),
    triton.Config({"BLOCK_K": 64, "BLOCK_P": 16}, num_warps=2),
]


@autotune(_CONFIGS, key=["K", "HW"])
@triton.jit
def _pool_kernel(
    g_ptr, w_ptr, K, HW, W, sgb, sgk, sgh, sgw, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr
):
    """``w[b, k] = mean_p G[b, k, p]`` for one batch row and a block of channels."""
    b = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    rows = g_ptr + ks.to(tl.int64)[:, None] * sgk
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        sp = plane_offset(b, ps // W, ps % W, sgb, sgh, sgw)
        acc += tl.load(rows + sp[None, :], mask=kmask[:, None] & (ps < HW)[None, :], other=0.0).to(ACC)
    tl.store(w_ptr + b.to(tl.int64) * K + ks, tl.sum(acc, axis=1) / HW, mask=kmask)


@autotune(_CONFIGS, key=["K", "HW"])
@triton.jit
def _reduce_kernel(
    a_ptr,
    g_ptr,
    gout_ptr,
    out_ptr,
    K,
    HW,
    W,
    sab,
    sak,
    sah,
    saw,
    sgb,
    sgk,
    sgh,
    sgw,
    sob,
    soh,
    sow,
    ELEMENTWISE: tl.constexpr,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """``s[b, p] = sum_k w * A`` over all channels for one block of pixels, then either
    ``cam = relu(s)`` in the output dtype (forward) or ``gm = gout * (s > 0)`` in ``ACC``
    (backward: the ReLU mask recomputed instead of stored).

    ``g_ptr`` holds ``G`` [B,K,H,W] when ``ELEMENTWISE``, else contiguous ``[B, K]`` weights.
    """
    b = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = ps < HW
    py = ps // W
    px = ps % W
    a_sp = (a_ptr + plane_offset(b, py, px, sab, sah, saw))[None, :]
    g_sp = (g_ptr + plane_offset(b, py, px, sgb, sgh, sgw))[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        m2 = kmask[:, None] & pmask[None, :]
        a = tl.load(a_sp + ks.to(tl.int64)[:, None] * sak, mask=m2, other=0.0).to(ACC)
        if ELEMENTWISE:
            g = tl.load(g_sp + ks.to(tl.int64)[:, None] * sgk, mask=m2, other=0.0).to(ACC)
        else:
            g = tl.load(g_ptr + b.to(tl.int64) * K + ks, mask=kmask, other=0.0).to(ACC)[:, None]
        acc += a * g
    s = tl.sum(acc, axis=0)
    out = out_ptr + b.to(tl.int64) * HW + ps
    if BACKWARD:
        go = tl.load(gout_ptr + plane_offset(b, py, px, sob, soh, sow), mask=pmask, other=0.0)
        tl.store(out, tl.where(s > 0, go.to(ACC), 0.0), mask=pmask)
    else:
        tl.store(out, tl.maximum(s, 0.0).to(out_ptr.dtype.element_ty), mask=pmask)


@autotune(_CONFIGS, key=["K", "HW"])
@triton.jit
def _elementwise_grad_kernel(
    a_ptr,
    g_ptr,
    gm_ptr,
    da_ptr,
    dg_ptr,
    K,
    HW,
    W,
    sab,
    sak,
    sah,
    saw,
    sgb,
    sgk,
    sgh,
    sgw,
    sdb,
    sdk,
    sdh,
    sdw,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """``dA = G * gm`` and ``dG = A * gm`` for one pixel block (outputs share strides ``sd*``)."""
    b = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = ps < HW
    py = ps // W
    px = ps % W
    gm = tl.load(gm_ptr + b.to(tl.int64) * HW + ps, mask=pmask, other=0.0)[None, :]
    a_sp = (a_ptr + plane_offset(b, py, px, sab, sah, saw))[None, :]
    g_sp = (g_ptr + plane_offset(b, py, px, sgb, sgh, sgw))[None, :]
    d_sp = plane_offset(b, py, px, sdb, sdh, sdw)[None, :]
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m2 = (ks < K)[:, None] & pmask[None, :]
        kk = ks.to(tl.int64)[:, None]
        a = tl.load(a_sp + kk * sak, mask=m2, other=0.0).to(ACC)
        g = tl.load(g_sp + kk * sgk, mask=m2, other=0.0).to(ACC)
        tl.store(da_ptr + d_sp + kk * sdk, (g * gm).to(da_ptr.dtype.element_ty), mask=m2)
        tl.store(dg_ptr + d_sp + kk * sdk, (a * gm).to(dg_ptr.dtype.element_ty), mask=m2)


@autotune(_CONFIGS, key=["K", "HW"])
@triton.jit
def _weighted_grad_kernel(
    a_ptr,
    w_ptr,
    gm_ptr,
    da_ptr,
    dg_ptr,
    K,
    HW,
    W,
    sab,
    sak,
    sah,
    saw,
    sdb,
    sdk,
    sdh,
    sdw,
    POOL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """For a block of channels: ``dA = w * gm`` and ``dw = sum_p A * gm``, stored as
    ``dG[b,k,:] = dw / HW`` when the weights were pooled from ``G`` (``dG`` strided like
    ``dA``), else as ``dW[b,k]`` (contiguous ``[B, K]``)."""
    b = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    kk = ks.to(tl.int64)[:, None]
    w = tl.load(w_ptr + b.to(tl.int64) * K + ks, mask=kmask, other=0.0).to(ACC)[:, None]
    dw = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
    for p0 in range(0, HW, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pmask = ps < HW
        m2 = kmask[:, None] & pmask[None, :]
        gm = tl.load(gm_ptr + b.to(tl.int64) * HW + ps, mask=pmask, other=0.0)[None, :]
        a_sp = plane_offset(b, ps // W, ps % W, sab, sah, saw)[None, :]
        a = tl.load(a_ptr + a_sp + kk * sak, mask=m2, other=0.0).to(ACC)
        d_sp = plane_offset(b, ps // W, ps % W, sdb, sdh, sdw)[None, :]
        tl.store(da_ptr + d_sp + kk * sdk, (w * gm).to(da_ptr.dtype.element_ty), mask=m2)
        dw += a * gm
    dw_k = tl.sum(dw, axis=1)
    if POOL:
        spread = tl.broadcast_to((dw_k / HW)[:, None], [BLOCK_K, BLOCK_P]).to(dg_ptr.dtype.element_ty)
        for p0 in range(0, HW, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m2 = kmask[:, None] & (ps < HW)[None, :]
            d_sp = plane_offset(b, ps // W, ps % W, sdb, sdh, sdw)[None, :]
            tl.store(dg_ptr + d_sp + kk * sdk, spread, mask=m2)
    else:
        tl.store(dg_ptr + b.to(tl.int64) * K + ks, dw_k.to(dg_ptr.dtype.element_ty), mask=kmask)


def _strides4(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


def _weights(gradients: torch.Tensor, pool: bool) -> torch.Tensor | None:
    """Contiguous per-channel weights ``[B, K]`` of the weighted forms (given ones as they
    are; spatial means of ``G`` pooled by a kernel, in the accumulation dtype, so that ``G``
    is read once); None for the elementwise form."""
    if gradients.dim() == 2:
        return gradients.contiguous()
    if not pool:
        return None
    B, K, H, W = gradients.shape
    w = torch.empty((B, K), dtype=acc_dtype(gradients.dtype), device=gradients.device)
    launch(_pool_kernel)[lambda meta: (B, triton.cdiv(K, meta["BLOCK_K"]))](
        gradients, w, K, H * W, W, *_strides4(gradients), ACC=tl_dtype(w.dtype)
    )
    return w


def _reduce(activations, g, gout, out, elementwise: bool, backward: bool) -> None:
    """Launch :func:`_reduce_kernel`: ``out = relu(s)`` or, when ``backward``, ``gout * (s > 0)``."""
    B, K, H, W = activations.shape
    sg = _strides4(g) if elementwise else (0, 0, 0, 0)
    so = tuple(gout.stride()) if backward else (0, 0, 0)
    launch(_reduce_kernel)[lambda meta: (B, triton.cdiv(H * W, meta["BLOCK_P"]))](
        activations,
        g,
        gout if backward else out,
        out,
        K,
        H * W,
        W,
        *_strides4(activations),
        *sg,
        *so,
        ELEMENTWISE=elementwise,
        BACKWARD=backward,
        ACC=tl_dtype(acc_dtype(activations.dtype)),
    )


def gradcam_forward(activations: torch.Tensor, gradients: torch.Tensor, pool: bool) -> torch.Tensor:
    """``relu(sum_k w * A)`` [B,H,W] in the input dtype (see the module docstring for ``w``)."""
    B, _K, H, W = activations.shape
    w = _weights(gradients, pool)
    out = torch.empty((B, H, W), dtype=activations.dtype, device=activations.device)
    _reduce(activations, gradients if w is None else w, None, out, w is None, False)
    return out


def gradcam_backward(
    grad_out: torch.Tensor, activations: torch.Tensor, gradients: torch.Tensor, pool: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dG)`` of :func:`gradcam_forward` for the upstream gradient ``grad_out`` [B,H,W];
    ``dG`` has the shape of ``gradients`` ([B,K,H,W] or [B,K])."""
    B, K, H, W = activations.shape
    acc = acc_dtype(activations.dtype)
    w = _weights(gradients, pool)
    gm = torch.empty((B, H * W), dtype=acc, device=activations.device)
    _reduce(activations, gradients if w is None else w, grad_out, gm, w is None, True)
    d_act = torch.empty((B, K, H, W), dtype=activations.dtype, device=activations.device)
    d_grad = torch.empty(gradients.shape, dtype=gradients.dtype, device=gradients.device)
    if w is None:
        launch(_elementwise_grad_kernel)[lambda meta: (B, triton.cdiv(H * W, meta["BLOCK_P"]))](
            activations,
            gradients,
            gm,
            d_act,
            d_grad,
            K,
            H * W,
            W,
            *_strides4(activations),
            *_strides4(gradients),
            *_strides4(d_act),
            ACC=tl_dtype(acc),
        )
    else:
        launch(_weighted_grad_kernel)[lambda meta: (B, triton.cdiv(K, meta["BLOCK_K"]))](
            activations,
            w,
            gm,
            d_act,
            d_grad,
            K,
            H * W,
            W,
            *_strides4(activations),
            *_strides4(d_act),
            POOL=gradients.dim() == 4,
            ACC=tl_dtype(acc),
        )
    return d_act, d_grad
