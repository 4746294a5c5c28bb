"""Robustness: max-sensitivity (Yeh et al.), the largest relative change of an explanation under
small input noise, batched over the images and the noise samples."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import transforms


def keyed_noise(seed: int, indices: list[int], shape: tuple[int, ...], radius: float):
    """``noise(s) -> [B, *shape]``: uniform noise in [-radius, radius] (the L-inf ball of
    Quantus's MaxSensitivity) for noise sample ``s`` of the images ``indices``, each drawn
    from a key of (seed, s, index): the same for any batch and any number of processes."""

    def noise(s: int) -> torch.Tensor:
        rows = transforms.sample_keys(seed, s, indices, "robustness")
        u = torch.stack([torch.rand(shape, generator=torch.Generator().manual_seed(k)) for k in rows])
        return (2 * u - 1) * radius

    return noise


def max_sensitivity(
    explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    noise: Callable[[int], torch.Tensor],
    *,
    samples: int = 10,
    batch_size: int = 256,
) -> torch.Tensor:
    """``max_s ||e(x + n_s) - e(x)|| / ||e(x)||`` [B] (Frobenius norms), as Quantus's
    MaxSensitivity: ``explain(images, targets)`` gives the explanations (the same ``targets``
    for the noisy copies), ``noise(s)`` the perturbation [B,C,H,W] of sample ``s``. The
    ``B * samples`` noisy images go through ``explain`` ``batch_size`` at a time. NaN for an
    image whose explanation is all zero (nothing to change relative to)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    B = images.shape[0]
    base = explain(images, targets).flatten(1).double()
    scale = base.norm(dim=1)
    worst = torch.zeros(B, dtype=torch.float64, device=images.device)
    per = max(1, batch_size // B)
    for s0 in range(0, samples, per):
        chunk = range(s0, min(samples, s0 + per))
        noisy = torch.cat([images + noise(s).to(images.device, images.dtype) for s in chunk])
        e = explain(noisy, targets.repeat(len(chunk))).flatten(1).double().view(len(chunk), B, -1)
        worst = torch.maximum(worst, ((e - base).norm(dim=2) / scale.clamp_min(1e-300)).amax(0))
    return torch.where(scale > 0, worst, torch.full_like(worst, float("nan")))
