"""Views of a dataset: class-balanced training subsets that a seed fixes and their file lists
(saved with every run so that a result can be traced to the images it saw), samples that carry
their index (for per-sample random keys), and one process's share for evaluation."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from .image_files import NO_LABEL


def targets_of(dataset) -> list[int]:
    """The labels of a dataset: ``targets`` of a file dataset, ``labels`` of an in-memory one."""
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [int(v) for v in dataset.labels]


def stratified_indices(
    targets: list[int], *, per_class: int | None = None, fraction: float | None = None, seed: int = 0
) -> list[int]:
    """Sorted indices of ``per_class`` samples of every class (all of a smaller class), or of a
    ``fraction`` of every class (at least one sample each).

    Each class's samples are ordered by one random permutation drawn from ``seed``, so the
    choice depends only on the labels and the seed, and for one seed a smaller subset is
    contained in every larger one.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(targets):
        by_class[label].append(i)
    gen = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        k = min(per_class, len(members)) if per_class is not None else max(1, round(fraction * len(members)))
        order = torch.randperm(len(members), generator=gen).tolist()
        chosen += [members[j] for j in order[:k]]
    return sorted(chosen)


def limit(
    dataset, *, per_class: int | None = None, fraction: float | None = None, seed: int = 0
) -> torch.utils.data.Subset:
    """The stratified subset of ``dataset`` chosen by :func:`stratified_indices`."""
    indices = stratified_indices(targets_of(dataset), per_class=per_class, fraction=fraction, seed=seed)
    return torch.utils.data.Subset(dataset, indices)


def write_file_list(path: str | Path, subset: torch.utils.data.Subset) -> None:
    """One line per chosen sample, ``<file relative to the dataset root>\\t<class>`` (the
    sample index instead of a file for in-memory datasets)."""
    base, targets = subset.dataset, targets_of(subset.dataset)
    classes = getattr(base, "classes", None)
    lines = []
    for i in subset.indices:
        name = base.name(i) if hasattr(base, "name") else str(i)
        lines.append(f"{name}\t{classes[targets[i]] if classes else targets[i]}")
    Path(path).write_text("\n".join(lines) + "\n")


class WithIndex(torch.utils.data.Dataset):
    """``dataset[i]`` followed by ``i``: batches carry their samples' indices, which key each
    sample's random crop and flip (:func:`cgc.transforms.sample_keys`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (*self.dataset[i], i)


def base_dataset(dataset):
    """The dataset under :class:`WithIndex` and ``Subset`` wrappers."""
    while isinstance(dataset, (WithIndex, torch.utils.data.Subset)):
        dataset = dataset.dataset
    return dataset


def set_epoch(dataset, epoch: int, seed: int) -> None:
    """Tell a dataset that draws per-sample randomness (file datasets' x_ce crops) the epoch."""
    base = base_dataset(dataset)
    if hasattr(base, "set_epoch"):
        base.set_epoch(epoch, seed)


def take(dataset, indices):
    """The samples ``indices`` of ``dataset``, keeping boxes and masks when it has them
    (``select``), e.g. one process's share for evaluation."""
    indices = list(indices)
    if len(indices) == len(dataset) and indices == list(range(len(dataset))):
        return dataset
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return torch.utils.data.Subset(dataset, indices)


class WithoutLabels(torch.utils.data.Dataset):
    """``dataset``'s images as unlabeled samples (``(image, NO_LABEL)``): the semi-supervised
    recipe's unlabeled stream made from the training set itself (``--unlabeled rest`` / ``all``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0], NO_LABEL
