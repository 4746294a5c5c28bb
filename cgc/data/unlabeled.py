"""Unlabeled images for the semi-supervised recipe: any tree of image files, and an endless
sampler so the unlabeled loader cycles while one epoch is one pass over the labeled data."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .folders import is_image
from .image_files import NO_LABEL, ImageFiles, LayoutError


def unlabeled_images(root: str | Path, image_size: int, *, strict: bool = False) -> ImageFiles:
    """Every image file under ``root`` (recursively, sorted) as ``(x_orig, NO_LABEL)`` items."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"unlabeled: {root} is not a folder; give any folder tree of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image(p))
    if not files:
        raise LayoutError(f"unlabeled: no image files (.jpg, .png, ...) under {root}")
    return ImageFiles(root, [(p, NO_LABEL) for p in files], [], image_size, strict=strict)


class CyclingSampler(torch.utils.data.Sampler):
    """An endless stream of indices of ``n`` samples: pass ``k`` is a permutation drawn from
    ``(seed, k)``. Starting at stream position ``start`` continues exactly where an
    interrupted run stopped, without replaying the images before it."""

    def __init__(self, n: int, seed: int, start: int = 0):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self):
        k, offset = divmod(self.start, self.n)
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            yield from torch.randperm(self.n, generator=gen)[offset:].tolist()
            k, offset = k + 1, 0


class CyclingBatchSampler(torch.utils.data.Sampler):
    """This process's share of endless global batches of ``batch_size`` unlabeled images:
    global batch ``k`` is images ``k * batch_size`` onwards of the :class:`CyclingSampler`
    stream, the same in any number of processes; process ``rank`` of ``world_size`` takes the
    ``rank``-th equal slice. ``start`` is the first global batch (resuming)."""

    def __init__(self, n: int, seed: int, batch_size: int, *, rank: int = 0, world_size: int = 1, start: int = 0):
        if batch_size % world_size:
            raise ConfigError(
                f"--unlabeled-batch-size {batch_size} is global and must divide evenly over the {world_size} processes"
            )
        self.n, self.seed, self.batch_size, self.rank, self.world, self.start = (
            n,
            seed,
            batch_size,
            rank,
            world_size,
            start,
        )

    def __iter__(self):
        stream = iter(CyclingSampler(self.n, self.seed, start=self.start * self.batch_size))
        share = self.batch_size // self.world
        while True:
            batch = [next(stream) for _ in range(self.batch_size)]
            yield batch[self.rank * share : (self.rank + 1) * share]
