"""Complexity of explanations: how concentrated a heatmap is (sparseness, the Gini index of
Chalasani et al.) and how spread its mass (complexity, the entropy of Bhatt et al.), computed as
Quantus's Sparseness and Complexity compute them (absolute values, each map divided by its
maximum first)."""

from __future__ import annotations

import torch


def _by_max(heatmaps: torch.Tensor) -> torch.Tensor:
    """|maps| [B,N] divided by their maximum (an all-zero map stays zero), in float64."""
    a = heatmaps.flatten(1).double().abs()
    top = a.amax(1, keepdim=True)
    return torch.where(top > 0, a / top.clamp_min(1e-300), a)


def sparseness(heatmaps: torch.Tensor) -> torch.Tensor:
    """Gini index [B] of each heatmap's values (+1e-7, as Quantus): 0 for a constant map, its
    largest, (N - 1) / N, for a map with one non-zero pixel. Higher: more concentrated."""
    a = (_by_max(heatmaps) + 1e-7).sort(dim=1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    return ((2 * k - n - 1) * a).sum(1) / (n * a.sum(1))


def complexity(heatmaps: torch.Tensor) -> torch.Tensor:
    """Entropy [B] of each heatmap's share of its total mass (natural log): 0 for one non-zero
    pixel, log N for a constant map; NaN for an all-zero map (no mass to share). Lower: simpler."""
    a = _by_max(heatmaps)
    total = a.sum(1, keepdim=True)
    p = torch.where(total > 0, a / total.clamp_min(1e-300), torch.full_like(a, float("nan")))
    return -(p * torch.log(p + 1e-12)).sum(1)
