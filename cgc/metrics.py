"""Batched metrics of classifiers and their explanations (protocols: METHOD.md).

Every function works on whole batches on the tensors' device. The functions that run a model
put it in eval mode for the measurement and restore the mode it had (the reference insertion
script left models in train mode, corrupting BatchNorm statistics).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import ops
from .cam import GradCAM, resize_heatmaps


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluate ``model`` in eval mode, then give every submodule back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (k capped at the
    number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks}


def box_region(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of boxes [B,N,4] (x0, y0, x1, y1 pixel edges; empty boxes ignored) -> bool [B,H,W]."""
    H, W = size
    ys = torch.arange(H, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(W, device=boxes.device, dtype=boxes.dtype) + 0.5
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)
    return inside.any(1)


def content_heatmap(heatmaps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Percentage of each heatmap's energy [B,H,W] inside ``region`` [B,H,W] (bool).

    Heatmaps are ReLU'd and normalised to sum 1; an all-zero heatmap carries no evidence and
    counts as uniform (its score is the region's area fraction).
    """
    h = heatmaps.clamp_min(0).flatten(1).double()
    total = h.sum(1, keepdim=True)
    h = torch.where(total > 0, h / total.clamp_min(1e-300), torch.full_like(h, 1.0 / h.shape[1]))
    return 100 * (h * region.flatten(1)).sum(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two batches of maps [B,...] (0 where a map is all zero)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def topk_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """IoU of the top-``fraction`` pixels of each pair of maps [B,...]."""
    a, b = a.flatten(1), b.flatten(1)
    k = max(1, round(fraction * a.shape[1]))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, 1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, 1).indices, True)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def consistency(cam: GradCAM, images: torch.Tensor, theta: torch.Tensor,
                size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Agreement between the heatmap of each transformed image and the transformed heatmap of
    the original, both at ``size`` (default: the images' size), for the class predicted on
    the original: ``(cosine [B], top-20 % IoU [B])``. The model is run as it is (mode kept)."""
    size = tuple(images.shape[-2:]) if size is None else size
    orig = cam(images)
    moved = ops.affine_warp(images, theta, images.shape[-2:], padding_mode="border")
    aug = cam(moved, orig.targets)
    p = ops.affine_warp(orig.cams[:, None], theta, size, padding_mode="border")[:, 0]
    q = resize_heatmaps(aug.cams, size)
    return cosine(q, p), topk_iou(q, p)
