"""What every metric needs: the model in eval mode, accuracy counts, box regions and the
evaluation images in order."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import data


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluate ``model`` in eval mode, then give every submodule back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (k capped at the
    number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks}


def box_region(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of boxes [B,N,4] (x0, y0, x1, y1 pixel edges; empty boxes ignored) -> bool [B,H,W]."""
    H, W = size
    ys = torch.arange(H, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(W, device=boxes.device, dtype=boxes.dtype) + 0.5
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)
    return inside.any(1)


def eval_batches(dataset, batch_size: int, limit: int | None = None, *, workers: int = 0):
    """``(uint8 images, labels, boxes or None)`` of the first ``limit`` items of ``dataset``, in
    order: boxes from :func:`cgc.data.annotated_batches` when the dataset has them; files
    are decoded by ``workers`` processes and unreadable ones left out."""
    if limit is not None and limit < len(dataset):
        dataset = data.take(dataset, range(limit))
    if hasattr(dataset, "boxes"):
        yield from data.annotated_batches(dataset, batch_size, workers=workers)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    for batch in loader:
        (images, labels), _ = data.drop_unreadable(batch[:2])
        if len(labels):
            yield images, labels, None
