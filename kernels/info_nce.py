"""InfoNCE kernels over L2-normalized rows, forward and backward, without normalized copies.

Forward:
1. :func:`_gram_kernel`: one pass over the raw rows of ``a`` (anchors) and ``p`` (positives)
   gives the raw Gram ``a a^T`` [B,B] (``tl.dot`` tiles, the ``D`` axis split over programs
   and summed with atomic adds) and per row ``(a.a, p.p, a.p)``.
2. :func:`_loss_kernel`: per row, the logits ``[a_b.p_b, a_b.a_k (k != b)] / (|a||.| T)`` from
   those numbers and an online logsumexp: ``loss_b = lse_b - pos_b``.

Backward, with ``P`` the softmax of each row's logits, ``g`` the upstream row gradients,
hats for normalized rows and ``c_b = g_b (P_b0 - 1) / T`` (the positive's coefficient):
``dA_hat = S A_hat + diag(c) P_hat`` and ``dP_hat = diag(c) A_hat``, where
``S_bk = (g_b P_bk + g_k P_kb) / T`` (k != b) collects every logit that row ``a_k`` enters;
then through the normalization ``da_b = (dA_hat_b - a_hat_b (a_hat_b . dA_hat_b)) / |a_b|``
(likewise for ``p``), the projections ``a_hat_b . dA_hat_b`` coming from [B,B] numbers
(cosines and ``S``). A row whose norm is under the guard ``EPS_NORM`` is divided by
``EPS_NORM`` without projection, exactly like the reference's clamp. The normalized form
(rather than folding the norms into ``S``) keeps the reference's exact cancellations, e.g.
zero gradients for ``D = 1``. :func:`_coef_kernel` computes ``S`` and the row terms;
:func:`_grad_kernel` does the ``[B,B] x [B,D]`` product and the row terms.

Explicit negatives ``n`` [N,D] (``NEG``; anchor b skips column ``idx_b``) run the same kernels on
the rectangular Gram ``a n^T`` [b,N]: the Gram kernel also sums ``n.n``, the loss and
coefficient kernels skip column ``idx_b`` instead of the diagonal, and since anchors and
negatives are separate inputs ``S`` keeps one role, ``W_bk = g_b P_bk / T``:
``dA_hat = W N_hat + diag(c) P_hat`` and ``dN_hat = W^T A_hat``. :func:`_neg_coef_kernel` sums
the negatives' projections ``n_hat_k . dN_hat_k`` down the columns of ``W`` (in a fixed order)
and :func:`_neg_grad_kernel` does the ``[N,b] x [b,D]`` product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import EPS_NORM as _EPS
from .common import INTERPRETED, acc_dtype, autotune, dot_dtype, launch, sm_count, tl_dtype

_GRAM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]
_GRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_D": 128}, num_warps=4, num_stages=3),
]
EPS_NORM = tl.constexpr(_EPS)
_ROW_BLOCK = 32  # rows per program of the two [B, B] kernels
_COL_BLOCK = 64  # columns per step of the two [B, B] kernels


@autotune(_GRAM_CONFIGS, key=["B", "N", "D"], reset_to_zero=["gram_ptr", "stats_ptr", "nsq_ptr"])
@triton.jit
def _gram_kernel(
    a_ptr,
    p_ptr,
    n_ptr,
    gram_ptr,
    stats_ptr,
    nsq_ptr,
    B,
    N,
    D,
    SPLIT,
    sab,
    sad,
    spb,
    spd,
    snb,
    snd,
    NEG: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Adds to ``gram[m-block, n-block]`` [B, N] (rows of ``a`` against rows of ``n``: ``a``
    itself in the square form) the product of one slice of ``D`` (slice ``pid 2`` of
    ``SPLIT``); the programs of column block 0 also add ``(a.a, p.p, a.p)`` of their rows to
    ``stats`` [B, 3], and with ``NEG`` those of row block 0 add ``n.n`` to ``nsq`` [N]. The
    outputs are zero-initialized, in the accumulation dtype."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first_col = tl.program_id(1) == 0
    mmask = rm < B
    nmask = rn < N
    per = tl.cdiv(tl.cdiv(D, BLOCK_D), SPLIT) * BLOCK_D
    d_lo = tl.program_id(2) * per
    d_hi = tl.minimum(D, d_lo + per)
    arow = a_ptr + rm.to(tl.int64)[:, None] * sab
    ncol = n_ptr + rn.to(tl.int64)[:, None] * snb
    prow = p_ptr + rm.to(tl.int64)[:, None] * spb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    aa = tl.zeros([BLOCK_M], dtype=ACC)
    pp = tl.zeros([BLOCK_M], dtype=ACC)
    ap = tl.zeros([BLOCK_M], dtype=ACC)
    nn = tl.zeros([BLOCK_N], dtype=ACC)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = (ds < d_hi)[None, :]
        am = tl.load(arow + ds.to(tl.int64)[None, :] * sad, mask=mmask[:, None] & dmask, other=0.0)
        an = tl.load(ncol + ds.to(tl.int64)[None, :] * snd, mask=nmask[:, None] & dmask, other=0.0)
        acc = tl.dot(am.to(DOT), tl.trans(an.to(DOT)), acc, input_precision="ieee")
        if first_col:
            a32 = am.to(ACC)
            p32 = tl.load(prow + ds.to(tl.int64)[None, :] * spd, mask=mmask[:, None] & dmask, other=0.0).to(ACC)
            aa += tl.sum(a32 * a32, axis=1)
            pp += tl.sum(p32 * p32, axis=1)
            ap += tl.sum(a32 * p32, axis=1)
        if NEG:
            if tl.program_id(0) == 0:
                n32 = an.to(ACC)
                nn += tl.sum(n32 * n32, axis=1)
    tl.atomic_add(gram_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])
    if first_col:
        tl.atomic_add(stats_ptr + rm * 3 + 0, aa, mask=mmask)
        tl.atomic_add(stats_ptr + rm * 3 + 1, pp, mask=mmask)
        tl.atomic_add(stats_ptr + rm * 3 + 2, ap, mask=mmask)
    if NEG:
        if tl.program_id(0) == 0:
            tl.atomic_add(nsq_ptr + rn, nn, mask=nmask)


@triton.jit
def _norm(sq):
    """Row norm from its sum of squares, clamped at EPS_NORM like the reference, and whether
    it is at least EPS_NORM. The guard is made in the dtype of ``sq``: a bare float literal
    would be a float32 constant, too coarse for the float64 path."""
    n = tl.sqrt(sq)
    eps = tl.full(n.shape, EPS_NORM, n.dtype)
    return tl.maximum(n, eps), n >= eps


@triton.jit
def _row_terms(stats_ptr, inv_t_ptr, rows, mask):
    """Per row: clamped norms of a and p, whether each norm is above the guard, the cosine
    of the positive pair and 1/T."""
    aa = tl.load(stats_ptr + rows * 3 + 0, mask=mask, other=0.0)
    pp = tl.load(stats_ptr + rows * 3 + 1, mask=mask, other=0.0)
    ap = tl.load(stats_ptr + rows * 3 + 2, mask=mask, other=0.0)
    na, act_a = _norm(aa)
    np_, act_p = _norm(pp)
    return na, np_, act_a, act_p, ap / (na * np_), tl.load(inv_t_ptr)


@triton.jit
def _log1p(x):
    """``log(1 + x)`` for ``x >= 0``, exact to rounding also for tiny ``x`` (Goldberg's
    correction; ``tl`` has no log1p that also runs in the interpreter)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _excluded(idx_ptr, rows, mask, NEG: tl.constexpr):
    """The column each row leaves out of its negatives: its own (the diagonal) in the square
    form, ``idx[row]`` (-1: none) with explicit negatives."""
    if NEG:
        own = tl.load(idx_ptr + rows, mask=mask, other=-1)
    else:
        own = rows
    return own


@triton.jit
def _loss_kernel(
    gram_ptr,
    stats_ptr,
    nsq_ptr,
    idx_ptr,
    inv_t_ptr,
    loss_ptr,
    lse_ptr,
    B,
    N,
    NSQ_STRIDE: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``loss_b = lse_b - pos_b`` with an online logsumexp over the negatives' column blocks;
    the squared norms of the columns are ``nsq[k * NSQ_STRIDE]`` (``a.a`` in ``stats``, or the
    negatives' ``n.n``).

    When the positive is the largest logit (a well-trained model), the loss is
    ``log1p(sum_k exp(neg_bk - pos_b))``, not a difference of two nearly equal numbers."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < B
    own = _excluded(idx_ptr, rm, mmask, NEG)
    na, _np, _act_a, _act_p, cos_p, inv_t = _row_terms(stats_ptr, inv_t_ptr, rm, mmask)
    pos = cos_p * inv_t
    neg_max = tl.zeros_like(pos) + float("-inf")
    neg_sum = tl.zeros_like(pos)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        nb, _ = _norm(tl.load(nsq_ptr + rn * NSQ_STRIDE, mask=nmask, other=0.0))
        gram = tl.load(
            gram_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=mmask[:, None] & nmask[None, :], other=0.0
        )
        logit = gram / (na[:, None] * nb[None, :]) * inv_t
        logit = tl.where(nmask[None, :] & (own[:, None] != rn[None, :]), logit, float("-inf"))
        new_max = tl.maximum(neg_max, tl.max(logit, axis=1))
        neg_sum = neg_sum * tl.exp(neg_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
        neg_max = new_max
    top = tl.maximum(pos, neg_max)
    rest = neg_sum * tl.exp(neg_max - top)
    loss = tl.where(pos >= neg_max, _log1p(rest), (top - pos) + tl.log(tl.exp(pos - top) + rest))
    tl.store(lse_ptr + rm, pos + loss, mask=mmask)
    tl.store(loss_ptr + rm, loss, mask=mmask)


@triton.jit
def _coef_kernel(
    gram_ptr,
    stats_ptr,
    nsq_ptr,
    idx_ptr,
    inv_t_ptr,
    lse_ptr,
    g_ptr,
    coef_ptr,
    rows_ptr,
    B,
    N,
    NSQ_STRIDE: tl.constexpr,
    NEG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``S`` [B,N] (zero in each row's excluded column) and per row ``(|a|, |p|, c,
    a_hat . dA_hat, cos(a, p))`` [B,5], the two projections zeroed for rows under the norm
    guard (module docstring); with ``NEG`` ``S`` is ``W``, the anchors' role alone.

    ``c = -g (1 - P_b0) / T`` sums the negatives' probabilities rather than subtracting
    ``P_b0`` from 1, which would cancel when the positive dominates."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < B
    own = _excluded(idx_ptr, rm, mmask, NEG)
    na, np_, act_a, act_p, cos_p, inv_t = _row_terms(stats_ptr, inv_t_ptr, rm, mmask)
    lse_m = tl.load(lse_ptr + rm, mask=mmask, other=0.0)
    g_m = tl.load(g_ptr + rm, mask=mmask, other=0.0)
    neg_prob = tl.zeros_like(lse_m)
    r = tl.zeros_like(lse_m)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        nb, _ = _norm(tl.load(nsq_ptr + rn * NSQ_STRIDE, mask=nmask, other=0.0))
        tile = mmask[:, None] & nmask[None, :]
        neg = tile & (own[:, None] != rn[None, :])
        gram = tl.load(gram_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], mask=tile, other=0.0)
        cos = gram / (na[:, None] * nb[None, :])
        logit = cos * inv_t
        p_row = tl.where(neg, tl.exp(logit - lse_m[:, None]), 0.0)
        if NEG:
            s = g_m[:, None] * p_row * inv_t
        else:
            lse_n = tl.load(lse_ptr + rn, mask=nmask, other=0.0)
            g_n = tl.load(g_ptr + rn, mask=nmask, other=0.0)
            p_col = tl.where(neg, tl.exp(logit - lse_n[None, :]), 0.0)
            s = (g_m[:, None] * p_row + g_n[None, :] * p_col) * inv_t
        neg_prob += tl.sum(p_row, axis=1)
        r += tl.sum(s * cos, axis=1)
        tl.store(coef_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], s, mask=tile)
    c = -g_m * neg_prob * inv_t
    r += c * cos_p
    tl.store(rows_ptr + rm * 5 + 0, na, mask=mmask)
    tl.store(rows_ptr + rm * 5 + 1, np_, mask=mmask)
    tl.store(rows_ptr + rm * 5 + 2, c, mask=mmask)
    tl.store(rows_ptr + rm * 5 + 3, tl.where(act_a, r, 0.0), mask=mmask)
    tl.store(rows_ptr + rm * 5 + 4, tl.where(act_p, cos_p, 0.0), mask=mmask)


@triton.jit
def _neg_coef_kernel(
    gram_ptr, stats_ptr, nsq_ptr, coef_ptr, nrows_ptr, B, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Per negative k: its clamped norm and ``n_hat_k . dN_hat_k = sum_b W_bk cos(a_b, n_k)``
    [N,2] (zeroed under the norm guard), down the column of ``W`` in row order (no atomics)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    nb, act_n = _norm(tl.load(nsq_ptr + rn, mask=nmask, other=0.0))
    r = tl.zeros_like(nb)
    for m0 in range(0, B, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < B
        na, _ = _norm(tl.load(stats_ptr + rm * 3, mask=mmask, other=0.0))
        tile = mmask[:, None] & nmask[None, :]
        offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
        gram = tl.load(gram_ptr + offs, mask=tile, other=0.0)
        w = tl.load(coef_ptr + offs, mask=tile, other=0.0)
        r += tl.sum(w * (gram / (na[:, None] * nb[None, :])), axis=0)
    tl.store(nrows_ptr + rn * 2 + 0, nb, mask=nmask)
    tl.store(nrows_ptr + rn * 2 + 1, tl.where(act_n, r, 0.0), mask=nmask)


@autotune(_GRAD_CONFIGS, key=["B", "K", "D"])
@triton.jit
def _grad_kernel(
    a_ptr,
    p_ptr,
    k_ptr,
    coef_ptr,
    rows_ptr,
    knorm_ptr,
    da_ptr,
    dp_ptr,
    B,
    K,
    D,
    sab,
    sad,
    spb,
    spd,
    skb,
    skd,
    KNORM_STRIDE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_D] tile of ``da`` and ``dp`` (contiguous outputs), with
    ``S X_hat`` as ``tl.dot`` tiles in the accumulation dtype: ``X`` [K,D] are the rows the
    anchors were contrasted with (the anchors, or the negatives), their clamped norms at
    ``knorm[k * KNORM_STRIDE]``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mmask = rm < B
    dmask = ds < D
    dcol = ds.to(tl.int64)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        coef = tl.load(
            coef_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0
        )
        nk = tl.load(knorm_ptr + rk * KNORM_STRIDE, mask=kmask, other=1.0)
        ak = (
            tl.load(
                k_ptr + rk.to(tl.int64)[:, None] * skb + dcol * skd, mask=kmask[:, None] & dmask[None, :], other=0.0
            ).to(ACC)
            / nk[:, None]
        )
        acc = tl.dot(coef, ak, acc, input_precision="ieee")
    tile = mmask[:, None] & dmask[None, :]
    na = tl.load(rows_ptr + rm * 5 + 0, mask=mmask, other=1.0)[:, None]
    np_ = tl.load(rows_ptr + rm * 5 + 1, mask=mmask, other=1.0)[:, None]
    c = tl.load(rows_ptr + rm * 5 + 2, mask=mmask, other=0.0)[:, None]
    r = tl.load(rows_ptr + rm * 5 + 3, mask=mmask, other=0.0)[:, None]
    q = tl.load(rows_ptr + rm * 5 + 4, mask=mmask, other=0.0)[:, None]
    a_hat = tl.load(a_ptr + rm.to(tl.int64)[:, None] * sab + dcol * sad, mask=tile, other=0.0).to(ACC) / na
    p_hat = tl.load(p_ptr + rm.to(tl.int64)[:, None] * spb + dcol * spd, mask=tile, other=0.0).to(ACC) / np_
    da_hat = acc + c * p_hat
    out = rm.to(tl.int64)[:, None] * D + dcol
    tl.store(da_ptr + out, ((da_hat - r * a_hat) / na).to(da_ptr.dtype.element_ty), mask=tile)
    tl.store(dp_ptr + out, (c * (a_hat - q * p_hat) / np_).to(dp_ptr.dtype.element_ty), mask=tile)


@autotune(_GRAD_CONFIGS, key=["B", "N", "D"])
@triton.jit
def _neg_grad_kernel(
    a_ptr,
    n_ptr,
    coef_ptr,
    rows_ptr,
    nrows_ptr,
    dn_ptr,
    B,
    N,
    D,
    sab,
    sad,
    snb,
    snd,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_D] tile of ``dn`` (contiguous): ``dN_hat = W^T A_hat`` as ``tl.dot``
    tiles (``W`` [b,N] read transposed), then ``(dN_hat - n_hat (n_hat . dN_hat)) / |n|``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mmask = rm < N
    dmask = ds < D
    dcol = ds.to(tl.int64)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for k0 in range(0, B, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < B
        coef = tl.load(
            coef_ptr + rk.to(tl.int64)[None, :] * N + rm[:, None], mask=mmask[:, None] & kmask[None, :], other=0.0
        )
        nk = tl.load(rows_ptr + rk * 5, mask=kmask, other=1.0)
        ak = (
            tl.load(
                a_ptr + rk.to(tl.int64)[:, None] * sab + dcol * sad, mask=kmask[:, None] & dmask[None, :], other=0.0
            ).to(ACC)
            / nk[:, None]
        )
        acc = tl.dot(coef, ak, acc, input_precision="ieee")
    tile = mmask[:, None] & dmask[None, :]
    nn = tl.load(nrows_ptr + rm * 2 + 0, mask=mmask, other=1.0)[:, None]
    r = tl.load(nrows_ptr + rm * 2 + 1, mask=mmask, other=0.0)[:, None]
    n_hat = tl.load(n_ptr + rm.to(tl.int64)[:, None] * snb + dcol * snd, mask=tile, other=0.0).to(ACC) / nn
    out = rm.to(tl.int64)[:, None] * D + dcol
    tl.store(dn_ptr + out, ((acc - r * n_hat) / nn).to(dn_ptr.dtype.element_ty), mask=tile)


def _split(B: int, N: int, D: int, device: torch.device) -> int:
    """Slices of ``D`` for the Gram kernel ([B,N] tiles): enough programs to fill the GPU
    (about two per SM) when the tiles alone are few; one slice on the CPU interpreter, and under
    ``torch.use_deterministic_algorithms``: with one slice every output element gets exactly
    one atomic add (onto zero), so the sums no longer depend on the order of the programs."""
    if INTERPRETED or device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
        return 1
    tiles = triton.cdiv(B, 64) * triton.cdiv(N, 64)
    return max(1, min(triton.cdiv(D, 512), 2 * sm_count(device) // tiles))


def _inv_t(temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a tensor, not a scalar argument: Triton passes Python floats as float32, too coarse
    # for the float64 path
    return torch.full((1,), 1.0 / temperature, dtype=dtype, device=device)


def info_nce_forward(anchors: torch.Tensor, positives: torch.Tensor, temperature: float):
    """Per-row losses [B] and what the backward reuses: row logsumexps [B], the raw Gram
    [B,B] and the row statistics ``(a.a, p.p, a.p)`` [B,3], all in the accumulation dtype."""
    B, D = anchors.shape
    acc = acc_dtype(anchors.dtype)
    dev = anchors.device
    gram = torch.zeros((B, B), dtype=acc, device=dev)
    stats = torch.zeros((B, 3), dtype=acc, device=dev)
    split = _split(B, B, D, dev)
    # the square form: the anchors are the Gram's columns too, their a.a the columns' squared
    # norms (stats with stride 3); the NEG=False kernels never read the nsq and index pointers
    launch(_gram_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(B, meta["BLOCK_N"]), split)](
        anchors,
        positives,
        anchors,
        gram,
        stats,
        stats,
        B,
        B,
        D,
        split,
        *anchors.stride(),
        *positives.stride(),
        *anchors.stride(),
        NEG=False,
        DOT=dot_dtype(anchors.dtype),
        ACC=tl_dtype(acc),
    )
    loss = torch.empty((B,), dtype=acc, device=dev)
    lse = torch.empty((B,), dtype=acc, device=dev)
    launch(_loss_kernel)[(triton.cdiv(B, _ROW_BLOCK),)](
        gram,
        stats,
        stats,
        stats,
        _inv_t(temperature, acc, dev),
        loss,
        lse,
        B,
        B,
        NSQ_STRIDE=3,
        NEG=False,
        BLOCK_M=_ROW_BLOCK,
        BLOCK_N=_COL_BLOCK,
    )
    return loss, lse, gram, stats


def info_nce_backward(
    grad_rows: torch.Tensor,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    temperature: float,
    lse: torch.Tensor,
    gram: torch.Tensor,
    stats: torch.Tensor,
):
    """``(d anchors, d positives)`` in the input dtype for upstream row gradients [B]."""
    B, D = anchors.shape
    acc = gram.dtype
    dev = anchors.device
    coef = torch.empty((B, B), dtype=acc, device=dev)
    rows = torch.empty((B, 5), dtype=acc, device=dev)
    launch(_coef_kernel)[(triton.cdiv(B, _ROW_BLOCK),)](  # square form: see info_nce_forward
        gram,
        stats,
        stats,
        stats,
        _inv_t(temperature, acc, dev),
        lse,
        grad_rows.to(acc).contiguous(),
        coef,
        rows,
        B,
        B,
        NSQ_STRIDE=3,
        NEG=False,
        BLOCK_M=_ROW_BLOCK,
        BLOCK_N=_COL_BLOCK,
    )
    d_a = torch.empty((B, D), dtype=anchors.dtype, device=dev)
    d_p = torch.empty((B, D), dtype=positives.dtype, device=dev)
    launch(_grad_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))](
        anchors,
        positives,
        anchors,
        coef,
        rows,
        rows,
        d_a,
        d_p,
        B,
        B,
        D,
        *anchors.stride(),
        *positives.stride(),
        *anchors.stride(),
        KNORM_STRIDE=5,
        ACC=tl_dtype(acc),
    )
    return d_a, d_p


def info_nce_neg_forward(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    anchor_index: torch.Tensor,
    temperature: float,
):
    """Explicit negatives [N,D]: per-row losses [b] and, for the backward, row logsumexps [b],
    the raw Gram ``a n^T`` [b,N], the row statistics [b,3] and the negatives' ``n.n`` [N]."""
    B, D = anchors.shape
    N = negatives.shape[0]
    acc = acc_dtype(anchors.dtype)
    dev = anchors.device
    gram = torch.zeros((B, N), dtype=acc, device=dev)
    stats = torch.zeros((B, 3), dtype=acc, device=dev)
    nsq = torch.zeros((N,), dtype=acc, device=dev)
    split = _split(B, N, D, dev)
    launch(_gram_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), split)](
        anchors,
        positives,
        negatives,
        gram,
        stats,
        nsq,
        B,
        N,
        D,
        split,
        *anchors.stride(),
        *positives.stride(),
        *negatives.stride(),
        NEG=True,
        DOT=dot_dtype(anchors.dtype),
        ACC=tl_dtype(acc),
    )
    loss = torch.empty((B,), dtype=acc, device=dev)
    lse = torch.empty((B,), dtype=acc, device=dev)
    launch(_loss_kernel)[(triton.cdiv(B, _ROW_BLOCK),)](
        gram,
        stats,
        nsq,
        anchor_index.contiguous(),
        _inv_t(temperature, acc, dev),
        loss,
        lse,
        B,
        N,
        NSQ_STRIDE=1,
        NEG=True,
        BLOCK_M=_ROW_BLOCK,
        BLOCK_N=_COL_BLOCK,
    )
    return loss, lse, gram, stats, nsq


def info_nce_neg_backward(
    grad_rows: torch.Tensor,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    anchor_index: torch.Tensor,
    temperature: float,
    lse: torch.Tensor,
    gram: torch.Tensor,
    stats: torch.Tensor,
    nsq: torch.Tensor,
):
    """``(d anchors, d positives, d negatives)`` in the input dtype for row gradients [b]."""
    B, D = anchors.shape
    N = negatives.shape[0]
    acc = gram.dtype
    dev = anchors.device
    coef = torch.empty((B, N), dtype=acc, device=dev)
    rows = torch.empty((B, 5), dtype=acc, device=dev)
    nrows = torch.empty((N, 2), dtype=acc, device=dev)
    launch(_coef_kernel)[(triton.cdiv(B, _ROW_BLOCK),)](
        gram,
        stats,
        nsq,
        anchor_index.contiguous(),
        _inv_t(temperature, acc, dev),
        lse,
        grad_rows.to(acc).contiguous(),
        coef,
        rows,
        B,
        N,
        NSQ_STRIDE=1,
        NEG=True,
        BLOCK_M=_ROW_BLOCK,
        BLOCK_N=_COL_BLOCK,
    )
    launch(_neg_coef_kernel)[(triton.cdiv(N, _COL_BLOCK),)](
        gram, stats, nsq, coef, nrows, B, N, BLOCK_M=_ROW_BLOCK, BLOCK_N=_COL_BLOCK
    )
    d_a = torch.empty((B, D), dtype=anchors.dtype, device=dev)
    d_p = torch.empty((B, D), dtype=positives.dtype, device=dev)
    d_n = torch.empty((N, D), dtype=negatives.dtype, device=dev)
    launch(_grad_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))](
        anchors,
        positives,
        negatives,
        coef,
        rows,
        nrows,
        d_a,
        d_p,
        B,
        N,
        D,
        *anchors.stride(),
        *positives.stride(),
        *negatives.stride(),
        KNORM_STRIDE=2,
        ACC=tl_dtype(acc),
    )
    launch(_neg_grad_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_D"]))](
        anchors, negatives, coef, rows, nrows, d_n, B, N, D, *anchors.stride(), *negatives.stride(), ACC=tl_dtype(acc)
    )
    return d_a, d_p, d_n
