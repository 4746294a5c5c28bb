"""The CGC loss: the heatmap of an augmented image must match the augmented heatmap of the
original image better than it matches the other images' heatmaps (InfoNCE), or simply match
it (the MSE ablation)."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .transforms import identity_theta

KINDS = ("infonce", "mse")
HEATMAP_EPS = 1e-8  # the recipe's guard: an all-zero heatmap still has a direction


class CGCLoss(nn.Module):
    """Contrastive Grad-CAM consistency between ``cam_orig`` and ``cam_aug`` [B,h,w].

    ``theta`` [B,2,3] is the crop/flip map that made the augmented image from the original
    (:mod:`cgc.transforms`). Both heatmaps are resized to ``heatmap_size`` (the anchor ``q``
    with an identity warp, the positive ``p`` with ``theta``: crop, resize and flip of the
    original heatmap), sum-normalized with a small epsilon, flattened and compared.
    ``heatmap_size=None`` compares them at the ``size`` passed with them (:func:`cgc.cgc_term`
    passes the image size):

    - ``kind="infonce"``: :func:`cgc.ops.info_nce` with ``temperature``; the negatives of
      ``q_b`` are the other augmented heatmaps of the batch (needs B >= 2). With ``gather``
      (``x -> (rows of every process, offset of this process's rows)``, differentiable, e.g.
      :meth:`cgc.distributed.Context.gather`) they are those of the whole global batch, and
      each process's loss is the mean over its own anchors;
    - ``kind="mse"``: mean over the batch of ``||q_b/|q_b| - p_b/|p_b| ||^2`` (= 2 - 2 cos),
      no negatives.

    ``padding_mode`` of the positive's warp (``border``, the default, or ``zeros``) decides
    what a crop that reaches the original's edge sees beyond it.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        heatmap_size: int | tuple[int, int] | None = 224,
        kind: str = "infonce",
        backend: str | None = None,
        gather=None,
        padding_mode: str = "border",
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.heatmap_size = heatmap_size
        self.kind = kind
        self.backend = backend
        self.gather = gather
        self.padding_mode = padding_mode

    def pair(self, cam_orig: torch.Tensor, cam_aug: torch.Tensor, theta: torch.Tensor, size=None):
        """The flattened anchors ``q`` (augmented view) and positives ``p`` [B, S*S]."""
        if cam_orig.dim() != 3 or cam_orig.shape != cam_aug.shape:
            raise ValueError(
                f"cam_orig and cam_aug must both be [B,h,w], got {tuple(cam_orig.shape)} and {tuple(cam_aug.shape)}"
            )
        size = self.heatmap_size or size
        if size is None:
            raise ValueError("CGCLoss(heatmap_size=None) needs the size=(H, W) to compare heatmaps at")
        b = cam_orig.shape[0]
        ident = identity_theta(b, cam_aug.device, theta.dtype)
        q = ops.affine_warp(cam_aug[:, None], ident, size, padding_mode="border", backend=self.backend).flatten(1)
        p = ops.affine_warp(
            cam_orig[:, None], theta, size, padding_mode=self.padding_mode, backend=self.backend
        ).flatten(1)
        q = q / (q.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS
        p = p / (p.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS
        return q, p

    def forward(self, cam_orig: torch.Tensor, cam_aug: torch.Tensor, theta: torch.Tensor, size=None) -> torch.Tensor:
        q, p = self.pair(cam_orig, cam_aug, theta, size)
        if self.kind == "infonce" and self.gather is not None:
            negatives, offset = self.gather(q)
            return ops.info_nce(q, p, self.temperature, negatives=negatives, anchor_index=offset, backend=self.backend)
        if self.kind == "infonce":
            return ops.info_nce(q, p, self.temperature, backend=self.backend)
        qn = q / q.norm(dim=1, keepdim=True)
        pn = p / p.norm(dim=1, keepdim=True)
        return (qn - pn).pow(2).sum(1).mean()

    def extra_repr(self) -> str:
        negatives = ", negatives=gathered" if self.gather is not None else ""
        return f"kind={self.kind}, temperature={self.temperature}, heatmap_size={self.heatmap_size}{negatives}"
