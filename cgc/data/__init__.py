"""Datasets by name. Every dataset yields ``(image uint8 [3,S,S], label)`` pairs of one
fixed size ``S``; normalisation and the augmented views are made on the device.

Datasets with ground truth for explanations also expose ``boxes`` [N,nb,4] (x0, y0, x1, y1
in pixels, empty boxes padded with zeros) and optionally ``masks`` [N,S,S].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .synthetic import SyntheticShapes

DATASETS = ("synthetic",)

#: normalisation of torchvision's ImageNet models, used for every dataset
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    """The splits of one dataset and what a model needs to know about it."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    classes: list[str]
    image_size: int
    in_memory: bool  # True: batches are cheap slices, worker processes would only add cost


def build(name: str, *, seed: int = 0, image_size: int | None = None, train_size: int = 6000,
          val_size: int = 1000, num_classes: int = 10) -> DataBundle:
    """The train and val splits of dataset ``name``."""
    if name == "synthetic":
        size = image_size or 64
        kw = dict(seed=seed, num_classes=num_classes, image_size=size)
        train = SyntheticShapes("train", train_size, **kw)
        val = SyntheticShapes("val", val_size, **kw)
        return DataBundle(train, val, train.classes, size, in_memory=True)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (any device) -> float32 normalised with :data:`MEAN`/:data:`STD`."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, to [0, 1] floats for pictures."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def annotated_batches(dataset, batch_size: int):
    """``(images uint8, labels, boxes)`` batches of a dataset with box annotations, in order."""
    if not hasattr(dataset, "boxes"):
        raise ValueError(f"{type(dataset).__name__} has no box annotations")
    for start in range(0, len(dataset), batch_size):
        sl = slice(start, start + batch_size)
        yield dataset.images[sl], dataset.labels[sl], dataset.boxes[sl]
