"""Similarities of two batches of heatmaps, row by row: cosine, top-k IoU, Spearman's rank
correlation and SSIM (the measures of the consistency, randomization and sanity checks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (0-based) along dim 1, ties sharing the mean of their positions, as
    scipy.stats.rankdata does."""
    s = x.sort(dim=1).values
    lo = torch.searchsorted(s, x, right=False)
    hi = torch.searchsorted(s, x, right=True)
    return (lo + hi - 1).double() / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each pair of maps [B,...] (ties get average ranks, as in
    scipy.stats.spearmanr); NaN where a map is constant (no ranking to correlate)."""
    ra, rb = _ranks(a.flatten(1).double().contiguous()), _ranks(b.flatten(1).double().contiguous())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def ssim(a: torch.Tensor, b: torch.Tensor, *, win_size: int = 7, data_range: float | None = None) -> torch.Tensor:
    """Mean structural similarity of each pair of maps [B,H,W], as scikit-image's
    ``structural_similarity`` computes it (uniform ``win_size`` window, K1 = 0.01, K2 = 0.03,
    sample covariances, the border of half a window left out); ``data_range`` defaults to each
    pair's max - min, as Quantus passes it. NaN for two equal constant maps."""
    if a.dim() != 3 or a.shape != b.shape:
        raise ValueError(
            f"ssim expects two batches of maps [B,H,W] of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs maps of at least {win_size} pixels a side, got {tuple(a.shape[-2:])}")
    x, y = a.double()[:, None], b.double()[:, None]
    if data_range is None:
        both = torch.cat([x, y], 1).flatten(1)
        rng = (both.amax(1) - both.amin(1))[:, None, None, None]
    else:
        rng = torch.full((x.shape[0], 1, 1, 1), float(data_range), dtype=torch.float64, device=x.device)
    mean = lambda t: F.avg_pool2d(t, win_size, stride=1)  # noqa: E731 - the valid windows only
    n = win_size * win_size
    ux, uy = mean(x), mean(y)
    vx = n / (n - 1) * (mean(x * x) - ux * ux)
    vy = n / (n - 1) * (mean(y * y) - uy * uy)
    vxy = n / (n - 1) * (mean(x * y) - ux * uy)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
