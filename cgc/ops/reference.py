"""Pure-PyTorch reference backend: the fallback on every device and the oracle of every test.

Written for clarity and float64 use, not speed. Inputs are assumed validated by
:mod:`cgc.ops` (shapes, dtypes, devices); these functions only compute.
"""

from __future__ import annotations

import torch

EPS_NORM = 1e-12  # same guard as F.normalize: a zero row stays zero instead of NaN


def gradcam(activations: torch.Tensor, weights: torch.Tensor, pool: bool = True) -> torch.Tensor:
    """``relu(sum_k w_k * A_k)`` with ``w`` = mean of the gradients over space (pool), the
    gradients themselves (element-wise, ``pool=False``), or given ``[B, K]`` weights."""
    if weights.dim() == 2:
        w = weights[:, :, None, None]
    elif pool:
        w = weights.mean(dim=(2, 3), keepdim=True)
    else:
        w = weights
    return torch.relu((w * activations).sum(dim=1))


def _source_coords(theta: torch.Tensor, size: tuple[int, int], in_hw: tuple[int, int]):
    """Pixel coordinates (x, y), each ``[B, h, w]``, that every output pixel samples.

    Output pixel centers in normalized coordinates (align_corners=False) are mapped by theta
    and un-normalized to the input's pixel grid, where pixel centers sit at integers.
    """
    h, w = size
    H, W = in_hw
    dtype, device = theta.dtype, theta.device
    xs = (2.0 * torch.arange(w, dtype=dtype, device=device) + 1.0) / w - 1.0
    ys = (2.0 * torch.arange(h, dtype=dtype, device=device) + 1.0) / h - 1.0
    gx = (
        theta[:, 0, 0, None, None] * xs[None, None, :]
        + theta[:, 0, 1, None, None] * ys[None, :, None]
        + theta[:, 0, 2, None, None]
    )
    gy = (
        theta[:, 1, 0, None, None] * xs[None, None, :]
        + theta[:, 1, 1, None, None] * ys[None, :, None]
        + theta[:, 1, 2, None, None]
    )
    return ((gx + 1.0) * W - 1.0) / 2.0, ((gy + 1.0) * H - 1.0) / 2.0


def affine_warp(
    input: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], padding_mode: str = "zeros"
) -> torch.Tensor:
    """Bilinear sampling of ``input`` [B,C,H,W] at the affine map ``theta`` [B,2,3] of an
    ``size`` output grid; equals ``grid_sample(affine_grid(...), align_corners=False)``.

    Written as explicit corner gathers so that it is an independent formulation of
    ``F.grid_sample``; differentiable in ``input`` (the gathers' backward is a scatter-add).
    """
    B, C, H, W = input.shape
    h, w = size
    coord_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x, y = _source_coords(theta.to(coord_dtype), (h, w), (H, W))
    if padding_mode == "border":
        x = x.clamp(0, W - 1)
        y = y.clamp(0, H - 1)
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.long()
    y0 = y0.long()
    flat = input.reshape(B, C, H * W)
    out = input.new_zeros(B, C, h * w)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        xi = x0 + dx
        yi = y0 + dy
        inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        idx = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).reshape(B, 1, h * w)
        vals = flat.gather(2, idx.expand(B, C, h * w))
        out = out + vals * (wgt * inside).reshape(B, 1, h * w).to(input.dtype)
    return out.reshape(B, C, h, w)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (guarded like ``F.normalize``)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS_NORM)


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, temperature: float, reduction: str = "mean"
) -> torch.Tensor:
    """InfoNCE over L2-normalized rows: the positive of anchor b is ``positives[b]``, its
    negatives are the other anchors ``anchors[k], k != b``.

    ``loss_b = logsumexp([a_b.p_b, a_b.a_k (k != b)] / T) - a_b.p_b / T``.
    """
    a = l2_normalize(anchors)
    p = l2_normalize(positives)
    pos = (a * p).sum(dim=1) / temperature
    gram = (a @ a.transpose(0, 1)) / temperature
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
    neg = gram.masked_fill(eye, float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    return _reduce(torch.logsumexp(logits, dim=1) - pos, reduction)


def info_nce_neg(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    anchor_index: torch.Tensor,
    temperature: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE with explicit negatives [N,D] over L2-normalized rows: the positive of anchor b
    is ``positives[b]``, its negatives every ``negatives[k]`` but ``k = anchor_index[b]`` (the
    anchor's own row among them; -1: none). Anchors and negatives are separate inputs, each with
    its own gradient, also when the negatives hold a copy of the anchors (an all_gather).

    ``loss_b = logsumexp([a_b.p_b, a_b.n_k (k != anchor_index[b])] / T) - a_b.p_b / T``.
    """
    a = l2_normalize(anchors)
    p = l2_normalize(positives)
    n = l2_normalize(negatives)
    pos = (a * p).sum(dim=1) / temperature
    cols = torch.arange(n.shape[0], device=n.device)
    own = anchor_index[:, None] == cols[None, :]  # -1 matches no column
    neg = ((a @ n.transpose(0, 1)) / temperature).masked_fill(own, float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    return _reduce(torch.logsumexp(logits, dim=1) - pos, reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
