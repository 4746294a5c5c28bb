"""The CGC loss: the heatmap of an augmented image must match the augmented heatmap of the
original image better than it matches the other images' heatmaps (InfoNCE), or simply match
it (the MSE ablation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
      each process's loss is the mean over its own anchors. ``class_negatives`` [B,K,h,w]
      passed to :meth:`forward` (heatmaps of the augmented images for K other classes) join
      the negatives, prepared like the anchors: a heatmap that looks the same whatever the
      class then costs as much as one that does not follow the crop;
    - ``kind="mse"``: mean over the batch of ``||q_b/|q_b| - p_b/|p_b| ||^2`` (= 2 - 2 cos),
      no negatives.

    ``padding_mode`` of the positive's warp (``border``, the default, or ``zeros``) decides
    what a crop that reaches the original's edge sees beyond it. ``mask_outside``: compare
    only the part of the augmented view that shows the original image (crops that extend past
    its borders, :data:`cgc.transforms.SAMPLERS` ``uniform``): both heatmaps are set to 0 where
    the view shows the padding (:meth:`coverage`) before they are normalized, so neither the
    heatmap of the padding nor the positive's made-up values beyond the original count.
    ``detach_target``: no gradient through the positive (the warped original heatmap), so the
    augmented view's heatmap moves towards it and the original's is shaped by cross-entropy
    alone (a stop-gradient, as self-training methods use against collapse).

    ``floor`` keeps the term well-conditioned where a heatmap is nearly empty (not the paper's,
    which has 0). Both sides are compared as directions, and the direction of a nearly empty
    heatmap (a CAM whose ReLU removed almost everything: the label's CAM of an image the
    classifier does not yet recognize) turns with the smallest change of the network: its
    gradient grows as 1 / its mass, and a run's end depends on rounding. With a floor, every
    cell of every heatmap gets ``floor`` times the batch's mean heatmap value (:meth:`reference`:
    the anchors' and positives' cells, over every process with ``gather``; detached) added
    before it is normalized: a heatmap far weaker than the batch's is compared as nearly
    uniform, and no heatmap's gradient exceeds about ``1 / floor`` times that of a typical one.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        heatmap_size: int | tuple[int, int] | None = 224,
        kind: str = "infonce",
        backend: str | None = None,
        gather=None,
        padding_mode: str = "border",
        mask_outside: bool = False,
        detach_target: bool = False,
        floor: float = 0.0,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not floor >= 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        self.temperature = float(temperature)
        self.heatmap_size = heatmap_size
        self.kind = kind
        self.backend = backend
        self.gather = gather
        self.padding_mode = padding_mode
        self.mask_outside = mask_outside
        self.detach_target = detach_target
        self.floor = float(floor)

    def _size(self, size):
        size = self.heatmap_size or size
        if size is None:
            raise ValueError("CGCLoss(heatmap_size=None) needs the size=(H, W) to compare heatmaps at")
        return size

    def coverage(self, theta: torch.Tensor, size) -> torch.Tensor:
        """[B, S*S]: 1 where a pixel of the augmented view (its center) shows the original image,
        0 where it shows the padding beyond the original's borders."""
        size = self._size(size)
        h, w = (size, size) if isinstance(size, int) else size
        grid = F.affine_grid(theta.float(), [theta.shape[0], 1, h, w], align_corners=False)
        return (grid.abs() <= 1).all(-1).flatten(1).float()

    def _normalize(self, rows: torch.Tensor, mask: torch.Tensor | None, floor: torch.Tensor | None) -> torch.Tensor:
        """Warped heatmaps [b, S*S] -> the rows compared: ``floor`` added to every cell, masked,
        sum-normalized."""
        if floor is not None:
            rows = rows + floor.to(rows.dtype)
        if mask is not None:
            rows = rows * mask
        return rows / (rows.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS

    def _prepare(self, cams: torch.Tensor, size, mask: torch.Tensor | None, floor=None) -> torch.Tensor:
        """Heatmaps [b,h,w] at the comparison size (identity warp), floored, masked, sum-normalized [b, S*S]."""
        ident = identity_theta(cams.shape[0], cams.device, torch.float32)
        q = ops.affine_warp(cams[:, None], ident, self._size(size), padding_mode="border", backend=self.backend)
        return self._normalize(q.flatten(1), mask, floor)

    def reference(self, cam_orig: torch.Tensor, cam_aug: torch.Tensor) -> torch.Tensor:
        """The floor's unit: the mean heatmap value of the batch (both views; with ``gather``,
        of the whole global batch), detached, at least float32."""
        wide = torch.promote_types(cam_orig.dtype, torch.float32)
        means = torch.stack([cam_orig, cam_aug], 1).detach().to(wide).flatten(1).mean(1, keepdim=True)
        if self.gather is not None:
            means = self.gather(means)[0]  # every process has the same number of images
        return means.mean()

    def floor_value(self, cam_orig: torch.Tensor, cam_aug: torch.Tensor) -> torch.Tensor | None:
        """What the floor adds to every cell (None without a floor)."""
        return self.floor * self.reference(cam_orig, cam_aug) if self.floor > 0 else None

    def pair(self, cam_orig: torch.Tensor, cam_aug: torch.Tensor, theta: torch.Tensor, size=None, cell_floor=None):
        """The flattened anchors ``q`` (augmented view) and positives ``p`` [B, S*S]; ``cell_floor``:
        the value added to every cell (default: :meth:`floor_value` of these heatmaps)."""
        if cam_orig.dim() != 3 or cam_orig.shape != cam_aug.shape:
            raise ValueError(
                f"cam_orig and cam_aug must both be [B,h,w], got {tuple(cam_orig.shape)} and {tuple(cam_aug.shape)}"
            )
        floor = self.floor_value(cam_orig, cam_aug) if cell_floor is None else cell_floor
        mask = self.coverage(theta, size) if self.mask_outside else None
        q = self._prepare(cam_aug, size, mask, floor)
        p = ops.affine_warp(
            cam_orig[:, None], theta, self._size(size), padding_mode=self.padding_mode, backend=self.backend
        ).flatten(1)
        p = self._normalize(p, mask, floor)
        return q, (p.detach() if self.detach_target else p)

    def forward(
        self,
        cam_orig: torch.Tensor,
        cam_aug: torch.Tensor,
        theta: torch.Tensor,
        size=None,
        class_negatives: torch.Tensor | None = None,
        *,
        cell_floor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss (a scalar). ``cell_floor``: what the floor adds to every cell, when the
        caller computed :meth:`floor_value` already (it gathers over the processes)."""
        floor = self.floor_value(cam_orig, cam_aug) if cell_floor is None else cell_floor
        q, p = self.pair(cam_orig, cam_aug, theta, size, floor)
        if class_negatives is not None:
            if self.kind != "infonce":
                raise ValueError("class_negatives are negatives of the InfoNCE loss; kind='mse' has none")
            b, k = class_negatives.shape[:2]
            if class_negatives.dim() != 4 or b != cam_aug.shape[0] or class_negatives.shape[2:] != cam_aug.shape[1:]:
                raise ValueError(
                    f"class_negatives must be [B,K,h,w] = [{cam_aug.shape[0]},K,{cam_aug.shape[1]},{cam_aug.shape[2]}], "
                    f"got {tuple(class_negatives.shape)}"
                )
            mask = self.coverage(theta, size).repeat_interleave(k, 0) if self.mask_outside else None
            extra = self._prepare(class_negatives.flatten(0, 1), size, mask, floor)
            rows = torch.cat([q, extra])  # the anchors first: anchor b's own row is b
            if self.gather is not None:
                rows, offset = self.gather(rows)
            else:
                offset = 0
            return ops.info_nce(q, p, self.temperature, negatives=rows, anchor_index=offset, backend=self.backend)
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
        masked = ", mask_outside=True" if self.mask_outside else ""
        detached = ", detach_target=True" if self.detach_target else ""
        floor = f", floor={self.floor}" if self.floor else ""
        return (
            f"kind={self.kind}, temperature={self.temperature}, heatmap_size={self.heatmap_size}"
            f"{negatives}{masked}{detached}{floor}"
        )
