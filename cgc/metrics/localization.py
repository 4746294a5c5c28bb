"""Agreement of heatmaps with human annotations: energy inside the boxes (content heatmap, which
is Quantus's relevance mass accuracy x 100) and the pointing game."""

from __future__ import annotations

import torch


def content_heatmap(heatmaps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Percentage of each heatmap's energy [B,H,W] inside ``region`` [B,H,W] (bool).

    Heatmaps are ReLU'd and normalized to sum 1; an all-zero heatmap carries no evidence and
    counts as uniform (its score is the region's area fraction).
    """
    h = heatmaps.clamp_min(0).flatten(1).double()
    total = h.sum(1, keepdim=True)
    h = torch.where(total > 0, h / total.clamp_min(1e-300), torch.full_like(h, 1.0 / h.shape[1]))
    return 100 * (h * region.flatten(1)).sum(1)


def pointing_game(heatmaps: torch.Tensor, region: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Hits [B] (bool): the maximum of each heatmap [B,H,W] lies in ``region`` [B,H,W] (bool),
    or within ``tolerance`` pixels (Euclidean, pixel centers) of it; the original pointing game
    used 15 px at 224 px. The first maximum counts; a constant heatmap points nowhere (miss)."""
    if heatmaps.dim() != 3 or region.shape != heatmaps.shape:
        raise ValueError(
            f"heatmaps [B,H,W] and region of the same shape expected, got "
            f"{tuple(heatmaps.shape)} and {tuple(region.shape)}"
        )
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    _B, H, W = heatmaps.shape
    flat = heatmaps.flatten(1)
    peak = flat.argmax(1)
    informative = flat.amax(1) > flat.amin(1)
    if tolerance == 0:
        hit = region.flatten(1).gather(1, peak[:, None])[:, 0]
    else:
        ys = torch.arange(H, device=heatmaps.device, dtype=torch.float32)
        xs = torch.arange(W, device=heatmaps.device, dtype=torch.float32)
        py, px = (peak // W).float(), (peak % W).float()
        d2 = (ys[None, :, None] - py[:, None, None]) ** 2 + (xs[None, None, :] - px[:, None, None]) ** 2
        hit = (region & (d2 <= tolerance**2)).flatten(1).any(1)
    return hit & informative
