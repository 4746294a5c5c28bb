"""Agreement of heatmaps with human annotations: energy inside the boxes (content heatmap, which
is Quantus's relevance mass accuracy x 100) and the pointing game, with what a heatmap that
knows nothing but where objects tend to be scores (:func:`center_heatmaps`) and the objects
away from the center (:func:`off_center`), where that prior does not help."""

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


#: the center baseline's standard deviation, as a fraction of the image side
CENTER_SIGMA = 0.25
#: an object is off-center when its box's center is farther than this fraction of the side
#: from the image's center, along x or y
OFF_CENTER = 0.25


def center_heatmaps(n: int, size: tuple[int, int], device=None) -> torch.Tensor:
    """[n,H,W]: a Gaussian centered on the image (standard deviation :data:`CENTER_SIGMA` of
    each side), the same for every image: the localization of a model that only knows that
    objects tend to lie near the center. Its pointing game hits exactly the boxes that cover
    the image's center pixel (for an even side, the one just above and left of the center)."""
    H, W = size
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5 - H / 2) / (CENTER_SIGMA * H)
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5 - W / 2) / (CENTER_SIGMA * W)
    g = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
    return g.expand(n, H, W)


def off_center(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B] bool: the image's first box (x0, y0, x1, y1) [B,nb,4] has its center farther than
    :data:`OFF_CENTER` of the side from the image's center (along x or y): an object near
    the border."""
    H, W = size
    box = boxes[:, 0].float()
    cx, cy = (box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2
    return ((cx - W / 2).abs() > OFF_CENTER * W) | ((cy - H / 2).abs() > OFF_CENTER * H)
