"""Random crop/flip transforms as affine maps, made in batches on the tensors' device.

A RandomResizedCrop box ``(i, j, h, w)`` (top, left, height, width, in pixels of an
``H x W`` image) followed by an optional horizontal flip is one affine map ``theta`` [2,3]
from output to input coordinates normalised to [-1, 1] (``align_corners=False``). The same
``theta`` makes the augmented image from the original (:func:`apply`) and the positive
heatmap from the original heatmap (:class:`cgc.losses.CGCLoss`), whatever their resolutions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops

#: RandomResizedCrop defaults of the CGC recipe (METHOD.md): area fraction and aspect ratio.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass
class CropFlip:
    """A batch of crop boxes ``[B,4]`` as (top, left, height, width) and flip bits ``[B]``."""

    boxes: torch.Tensor
    flips: torch.Tensor
    height: int
    width: int

    def theta(self) -> torch.Tensor:
        """The affine maps ``[B,2,3]`` of these crops and flips (see :func:`crop_flip_theta`)."""
        return crop_flip_theta(self.boxes, self.flips, self.height, self.width)


def random_resized_crop_boxes(batch: int, height: int, width: int, *,
                              scale: tuple[float, float] = DEFAULT_SCALE,
                              ratio: tuple[float, float] = DEFAULT_RATIO,
                              generator: torch.Generator | None = None,
                              device: torch.device | str = "cpu", tries: int = 10) -> torch.Tensor:
    """Boxes ``[B,4]`` (top, left, height, width) drawn as torchvision's RandomResizedCrop
    draws them: area fraction in ``scale``, log-uniform aspect ratio in ``ratio``, up to
    ``tries`` attempts per box, then a centre crop clamped to ``ratio``. Batched, float."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    area = height * width
    u = torch.rand(3, batch, tries, generator=generator, device=gen_device, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.long))
    # fallback: the largest centred box within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    rows = torch.arange(batch, device=gen_device)
    pick = first.clamp_min(0)
    bw = torch.where(first >= 0, w[rows, pick], torch.full_like(w[:, 0], fw))
    bh = torch.where(first >= 0, h[rows, pick], torch.full_like(h[:, 0], fh))
    # position uniform over the valid integer offsets, as torch.randint(0, H - h + 1) does
    top = torch.floor(u[2, :, 0] * (height - bh + 1)).clamp_max(height - bh)
    left_u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
    left = torch.floor(left_u * (width - bw + 1)).clamp_max(width - bw)
    centred = first < 0
    top = torch.where(centred, torch.floor((height - bh) / 2), top)
    left = torch.where(centred, torch.floor((width - bw) / 2), left)
    return torch.stack([top, left, bh, bw], dim=1).to(device=device, dtype=torch.float32)


def random_crop_flip(batch: int, height: int, width: int, *, scale=DEFAULT_SCALE,
                     ratio=DEFAULT_RATIO, flip_p: float = 0.5,
                     generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> CropFlip:
    """Random RandomResizedCrop boxes plus horizontal flips with probability ``flip_p``."""
    boxes = random_resized_crop_boxes(batch, height, width, scale=scale, ratio=ratio,
                                      generator=generator, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    flips = torch.rand(batch, generator=generator, device=gen_device) < flip_p
    return CropFlip(boxes, flips.to(device), height, width)


def crop_flip_theta(boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine maps ``[B,2,3]`` (output -> input, normalised, align_corners=False) of crops
    ``boxes`` [B,4] = (top, left, h, w) of an ``height x width`` image, each resized to the
    output and flipped horizontally where ``flips`` [B] is true."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [B,4] (top, left, height, width), got {tuple(boxes.shape)}")
    if flips.shape != boxes.shape[:1]:
        raise ValueError(f"flips must be [B] for {boxes.shape[0]} boxes, got {tuple(flips.shape)}")
    b = boxes.to(torch.float32)
    top, left, h, w = b.unbind(1)
    sign = 1.0 - 2.0 * flips.to(torch.float32)
    theta = torch.zeros(b.shape[0], 2, 3, dtype=torch.float32, device=b.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return theta


def identity_theta(batch: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B,2,3]`` identity maps: with ``padding_mode="border"``, warping is plain resizing."""
    return torch.eye(2, 3, dtype=dtype, device=device).expand(batch, 2, 3)


def apply(images: torch.Tensor, theta: torch.Tensor, size=None, *, padding_mode: str = "border",
          backend: str | None = None) -> torch.Tensor:
    """Warp a batch of images [B,C,H,W] with ``theta`` to ``size`` (default: same size):
    makes the augmented view on the device with the same op as the heatmap warp."""
    size = images.shape[-2:] if size is None else size
    return ops.affine_warp(images, theta, size, padding_mode=padding_mode, backend=backend)
