"""Faithfulness: RISE's insertion and deletion curves (does the model's confidence follow the
pixels the heatmap ranks highest?)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cam import resize_heatmaps
from ..structure import logits_of
from .common import eval_mode

#: RISE's reference: 224 * 8 pixels per step at 224 x 224, i.e. 28 steps (+ the start image)
REFERENCE_STEPS = 28


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur of [B,C,H,W] with zero padding, as RISE's insertion
    substrate (separable: two 1-D convolutions equal the 2-D one, zero padding included)."""
    if kernel_size < 1 or kernel_size % 2 == 0 or not sigma > 0:
        raise ValueError(f"kernel_size must be odd and >= 1 and sigma > 0, got {kernel_size}, {sigma}")
    r = kernel_size // 2
    t = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - r
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    C = images.shape[1]
    out = F.conv2d(images, g.view(1, 1, 1, -1).expand(C, 1, 1, kernel_size), padding=(0, r), groups=C)
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(C, 1, kernel_size, 1), padding=(r, 0), groups=C)


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves [B,n+1] sampled at n equal steps over [0, 1] (trapezoid rule)."""
    if curves.dim() != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves [B,n+1] with n >= 1 expected, got {tuple(curves.shape)}")
    return (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)


def insertion_deletion(
    model: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    *,
    mode: str = "insertion",
    step: int | None = None,
    batch_size: int = 256,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RISE's causal metrics of saliency maps [B,h,w] for normalized images [B,C,H,W]:
    ``(auc [B], curves [B,n+1])``.

    Pixels are taken in order of decreasing saliency (maps are resized to the image first),
    ``step`` at a time (default ``ceil(H*W / 28)``: RISE's 224 * 8 at 224 px). Insertion starts
    from :func:`gaussian_blur` (k=11, sigma=5) of the image and puts the original pixels back;
    deletion starts from the image and sets pixels to zero (the dataset mean, once
    normalized). ``curves[:, i]`` is the softmax probability, after ``i`` steps, of
    ``targets`` (default: the class predicted on the clean image). All ``B * (n+1)`` images
    are made on the fly and go through the model ``batch_size`` at a time, in eval mode.
    """
    if mode not in ("insertion", "deletion"):
        raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}")
    if images.dim() != 4 or saliency.dim() != 3 or saliency.shape[0] != images.shape[0]:
        raise ValueError(
            f"images [B,C,H,W] and saliency [B,h,w] expected, got {tuple(images.shape)} and {tuple(saliency.shape)}"
        )
    B, _, H, W = images.shape
    HW = H * W
    step = math.ceil(HW / REFERENCE_STEPS) if step is None else step
    if step < 1 or batch_size < 1:
        raise ValueError(f"step and batch_size must be >= 1, got {step}, {batch_size}")
    n = math.ceil(HW / step)
    saliency = saliency.to(images.device, torch.float32)
    if saliency.shape[-2:] != (H, W):
        saliency = resize_heatmaps(saliency, (H, W))
    order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(HW, device=order.device).expand(B, HW))
    rank = rank.view(B, 1, H, W)
    if mode == "insertion":
        start, finish = gaussian_blur(images), images
    else:
        start, finish = images, torch.zeros_like(images)
    scores = torch.empty(B * (n + 1), device=images.device)
    with eval_mode(model), torch.no_grad():
        if targets is None:
            targets = logits_of(model(images)).argmax(1)
        targets = targets.to(images.device).long()
        for p0 in range(0, B * (n + 1), batch_size):
            p = torch.arange(p0, min(p0 + batch_size, B * (n + 1)), device=images.device)
            b, i = p // (n + 1), p % (n + 1)
            changed = rank[b] < (i * step).view(-1, 1, 1, 1)
            x = torch.where(changed, finish[b], start[b])
            probs = logits_of(model(x)).float().softmax(1)
            scores[p0 : p0 + p.shape[0]] = probs.gather(1, targets[b, None])[:, 0]
    curves = scores.view(B, n + 1)
    return auc(curves), curves
