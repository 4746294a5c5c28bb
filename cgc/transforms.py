"""Random crop/flip transforms as affine maps, made in batches on the tensors' device.

A RandomResizedCrop box ``(i, j, h, w)`` (top, left, height, width, in pixels of an
``H x W`` image) followed by an optional horizontal flip is one affine map ``theta`` [2,3]
from output to input coordinates normalized to [-1, 1] (``align_corners=False``). The same
``theta`` makes the augmented image from the original (:func:`apply`) and the positive
heatmap from the original heatmap (:class:`cgc.losses.CGCLoss`), whatever their resolutions.

Random numbers come from a ``generator`` or, for runs that must not depend on how a batch is
split over processes, from per-sample ``keys`` (:func:`sample_keys`: a hash of seed, epoch,
sample index and purpose): then every image gets the same crop and flip in any batch, on any
number of processes, and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops

#: RandomResizedCrop defaults of the CGC recipe (docs/method.md): area fraction and aspect ratio.
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: the area range of the training recipe's cross-entropy view here (the paper's is 0.08-1; at
#: the built-in dataset's 64 px, smaller crops often lose the object)
CE_SCALE = (0.25, 1.0)
#: how crop boxes are placed: inside the image (RandomResizedCrop), or anywhere they overlap it
#: so that every pixel is covered equally often (see :func:`boxes_from_uniforms`)
SAMPLERS = ("rrc", "uniform")
#: attempts per box before the center-crop fallback (as torchvision's RandomResizedCrop)
TRIES = 10
#: what a keyed draw is for: each purpose gets its own independent numbers
STREAMS = {"aug": 1, "ce": 2, "unlabeled": 3, "consistency": 4, "robustness": 5, "random_logit": 6}
_MASK = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def sample_keys(seed: int, epoch: int, indices, stream: str) -> list[int]:
    """One 63-bit key per sample index: a hash (splitmix64) of (``seed``, ``epoch``, index,
    ``stream``, a name of :data:`STREAMS`)."""
    base = _splitmix(_splitmix(_splitmix(seed & _MASK) ^ (epoch & _MASK)) ^ STREAMS[stream])
    return [_splitmix(base ^ (int(i) & _MASK)) >> 1 for i in indices]


def uniforms(batch: int, n: int, *, generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
    """Float64 uniforms [batch, n] on the CPU: row b from ``keys[b]`` when keys are given (the
    same row for the same key, whatever else is in the batch), else from ``generator``."""
    if keys is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(batch, n, generator=generator, device=gen_device, dtype=torch.float64).cpu()
    if len(keys) != batch:
        raise ValueError(f"{len(keys)} keys for a batch of {batch}")
    rows = [torch.rand(n, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in keys]
    return torch.stack(rows) if rows else torch.empty(0, n, dtype=torch.float64)


@dataclass
class CropFlip:
    """A batch of crop boxes ``[B,4]`` as (top, left, height, width), horizontal flip bits
    ``[B]`` and, optionally, vertical flip bits ``[B]``."""

    boxes: torch.Tensor
    flips: torch.Tensor
    height: int
    width: int
    vflips: torch.Tensor | None = None

    def theta(self) -> torch.Tensor:
        """The affine maps ``[B,2,3]`` of these crops and flips (see :func:`crop_flip_theta`)."""
        return crop_flip_theta(self.boxes, self.flips, self.height, self.width, vflips=self.vflips)


def boxes_from_uniforms(
    u: torch.Tensor,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    sampler: str = "rrc",
) -> torch.Tensor:
    """Boxes ``[B,4]`` (top, left, height, width; float) from uniforms ``u`` [B, 3*tries + 1].

    The size is drawn as torchvision's RandomResizedCrop draws it: area fraction in ``scale``,
    log-uniform aspect ratio in ``ratio``, up to ``tries`` attempts at a box that fits, then the
    largest box within ``ratio``. The position depends on the ``sampler``:

    - ``rrc``: RandomResizedCrop's, uniform over the integer offsets that keep the box inside
      the image (the fallback box centered). A pixel near the center is inside more boxes than
      one near a border;
    - ``uniform``: uniform over every integer offset at which the box overlaps the image, so it
      may extend past the borders: each pixel of the image is inside the box with the same
      probability, ``h / (H + h - 1)`` per axis for a box of height ``h``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    batch, tries = u.shape[0], (u.shape[1] - 1) // 3
    area = height * width
    u_area, u_ratio, u_top = u[:, :tries], u[:, tries : 2 * tries], u[:, 2 * tries : 3 * tries]
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.long))
    # fallback: the largest centered box within the ratio range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    rows = torch.arange(batch)
    pick = first.clamp_min(0)
    bw = torch.where(first >= 0, w[rows, pick], torch.full_like(w[:, 0], fw))
    bh = torch.where(first >= 0, h[rows, pick], torch.full_like(h[:, 0], fh))
    u_top, u_left = u_top[rows, pick], u[:, 3 * tries]
    if sampler == "uniform":  # offsets -(h - 1) .. H - 1: at least one row and column inside
        top = torch.floor(u_top * (height + bh - 1)).clamp_max(height + bh - 2) - (bh - 1)
        left = torch.floor(u_left * (width + bw - 1)).clamp_max(width + bw - 2) - (bw - 1)
        return torch.stack([top, left, bh, bw], dim=1).float()
    # position uniform over the valid integer offsets, as torch.randint(0, H - h + 1) does
    top = torch.floor(u_top * (height - bh + 1)).clamp_max(height - bh)
    left = torch.floor(u_left * (width - bw + 1)).clamp_max(width - bw)
    centered = first < 0
    top = torch.where(centered, torch.floor((height - bh) / 2), top)
    left = torch.where(centered, torch.floor((width - bw) / 2), left)
    return torch.stack([top, left, bh, bw], dim=1).float()


def random_resized_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
    keys=None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boxes ``[B,4]`` (top, left, height, width) drawn as torchvision's RandomResizedCrop
    draws them (:func:`boxes_from_uniforms`), from ``generator`` or per-sample ``keys``."""
    u = uniforms(batch, 3 * TRIES + 1, generator=generator, keys=keys)
    return boxes_from_uniforms(u, height, width, scale=scale, ratio=ratio).to(device)


def random_crop_flip(
    batch: int,
    height: int,
    width: int,
    *,
    scale=DEFAULT_SCALE,
    ratio=DEFAULT_RATIO,
    flip_p: float = 0.5,
    vflip_p: float = 0.0,
    sampler: str = "rrc",
    generator: torch.Generator | None = None,
    keys=None,
    device: torch.device | str = "cpu",
) -> CropFlip:
    """Random crop boxes (``sampler``: RandomResizedCrop's, or with uniform coverage, see
    :func:`boxes_from_uniforms`) plus horizontal flips with probability ``flip_p`` (and
    vertical ones with ``vflip_p``), from ``generator`` or per-sample ``keys``
    (:func:`sample_keys`)."""
    u = uniforms(batch, 3 * TRIES + 3, generator=generator, keys=keys)
    boxes = boxes_from_uniforms(u[:, : 3 * TRIES + 1], height, width, scale=scale, ratio=ratio, sampler=sampler)
    flips = u[:, 3 * TRIES + 1] < flip_p
    vflips = (u[:, 3 * TRIES + 2] < vflip_p).to(device) if vflip_p > 0 else None
    return CropFlip(boxes.to(device), flips.to(device), height, width, vflips)


def crop_flip_theta(
    boxes: torch.Tensor, flips: torch.Tensor, height: int, width: int, *, vflips: torch.Tensor | None = None
) -> torch.Tensor:
    """Affine maps ``[B,2,3]`` (output -> input, normalized, align_corners=False) of crops
    ``boxes`` [B,4] = (top, left, h, w) of an ``height x width`` image, each resized to the
    output and flipped horizontally where ``flips`` [B] is true (vertically where ``vflips``)."""
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
    theta[:, 1, 1] = h / height if vflips is None else (1.0 - 2.0 * vflips.to(torch.float32)) * h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return theta


def identity_theta(batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B,2,3]`` identity maps: with ``padding_mode="border"``, warping is plain resizing."""
    return torch.eye(2, 3, dtype=dtype, device=device).expand(batch, 2, 3)


def image_padding(sampler: str) -> str:
    """What an augmented image shows beyond the original's borders: crops of the ``uniform``
    sampler reach past them and are padded with zeros (the mean color of normalized images);
    RandomResizedCrop's stay inside, where ``border`` only affects the edge's last half pixel."""
    return "zeros" if sampler == "uniform" else "border"


def apply(
    images: torch.Tensor, theta: torch.Tensor, size=None, *, padding_mode: str = "border", backend: str | None = None
) -> torch.Tensor:
    """Warp a batch of images [B,C,H,W] with ``theta`` to ``size`` (default: same size):
    makes the augmented view on the device with the same op as the heatmap warp."""
    size = images.shape[-2:] if size is None else size
    return ops.affine_warp(images, theta, size, padding_mode=padding_mode, backend=backend)
