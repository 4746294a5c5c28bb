"""Consistency of explanations under crops and flips: what CGC optimizes, measured directly."""

from __future__ import annotations

import torch

from .. import ops
from ..cam import CAM, resize_heatmaps
from .similarity import cosine, topk_iou


def consistency(
    cam: CAM, images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
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
