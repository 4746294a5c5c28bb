"""Datasets by name. Every dataset yields ``(image uint8 [3,S,S], label)`` pairs of one
fixed size ``S``; normalization and the augmented views are made on the device.

File datasets (``folder``, ``imagenet``, ``cub``, ``cars``, ``flowers``, ``aircraft``) decode
and resize in loader workers; their training split yields ``(x_orig, label, x_ce)`` with the
cross-entropy view cut from the decoded image (see :mod:`cgc.data.files`), and a sample whose
file cannot be decoded comes with the label :data:`UNREADABLE` (see :func:`drop_unreadable`).

A dataset with ground truth for explanations has a ``boxes`` attribute; read it with
:func:`annotated_batches`, which gives the boxes [B,nb,4] as (x0, y0, x1, y1) in pixels of the
image as fed to the model (empty boxes padded with zeros). The built-in dataset also has
``masks`` [N,S,S].
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, UnknownName
from . import finegrained, folders, synthetic
from .files import NO_LABEL, UNREADABLE, ImageFiles, LayoutError, UnreadableImage, drop_unreadable
from .subsets import WithIndex, WithoutLabels, base_dataset, limit, set_epoch, take, write_file_list
from .synthetic import SyntheticShapes
from .unlabeled import CyclingBatchSampler, CyclingSampler, unlabeled_images

#: dataset name -> (function reading a root into a Listing, the layout it expects)
FILE_DATASETS = {
    "folder": (folders.folder, folders.FOLDER_LAYOUT),
    "imagenet": (folders.imagenet, folders.IMAGENET_LAYOUT),
    "cub": (finegrained.cub, finegrained.CUB_LAYOUT),
    "cars": (finegrained.cars, finegrained.CARS_LAYOUT),
    "flowers": (finegrained.flowers, finegrained.FLOWERS_LAYOUT),
    "aircraft": (finegrained.aircraft, finegrained.AIRCRAFT_LAYOUT),
}
DATASETS = ("synthetic", *FILE_DATASETS)
#: input size of the file datasets unless --image-size says otherwise
FILE_IMAGE_SIZE = 224

#: normalization of torchvision's ImageNet models, used for every dataset
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

__all__ = [
    "DATASETS",
    "FILE_DATASETS",
    "NO_LABEL",
    "UNREADABLE",
    "CyclingBatchSampler",
    "CyclingSampler",
    "DataBundle",
    "ImageFiles",
    "LayoutError",
    "UnreadableImage",
    "WithIndex",
    "WithoutLabels",
    "annotated_batches",
    "base_dataset",
    "build",
    "build_for_run",
    "denormalize",
    "drop_unreadable",
    "limit",
    "normalize",
    "set_epoch",
    "synthetic",
    "take",
    "unlabeled_images",
    "write_file_list",
]


@dataclass
class DataBundle:
    """The splits of one dataset and what a model needs to know about it."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    classes: list[str]
    image_size: int
    in_memory: bool  # True: batches are cheap slices, worker processes would only add cost


def build(
    name: str,
    *,
    seed: int = 0,
    image_size: int | None = None,
    train_size: int = 6000,
    val_size: int = 1000,
    num_classes: int = 10,
    root: str | Path | None = None,
    strict: bool = False,
    ce_crop_scale: tuple[float, float] = (0.08, 1.0),
    everything: bool = False,
    classes: list[str] | None = None,
    placement: str = "anywhere",
) -> DataBundle:
    """The train and val splits of dataset ``name``.

    ``train_size``, ``val_size``, ``num_classes`` (or the shape names ``classes``) and
    ``placement`` (:data:`cgc.data.synthetic.PLACEMENTS`) shape the synthetic dataset; ``root`` is
    the folder of a file dataset, ``strict`` makes an unreadable image an error, and
    ``ce_crop_scale`` is the area range of a file dataset's x_ce crop. ``everything``
    (evaluating a model trained elsewhere): a ``folder`` tree is not split, every image is a
    val image, and the training split may be empty.
    """
    if name == "synthetic":
        size = image_size or 64
        kw = dict(seed=seed, num_classes=num_classes, image_size=size, classes=classes, placement=placement)
        train = SyntheticShapes("train", train_size, **kw)
        val = SyntheticShapes("val", val_size, **kw)
        return DataBundle(train, val, train.classes, size, in_memory=True)
    if name not in FILE_DATASETS:
        raise UnknownName("dataset", name, DATASETS)
    if classes is not None:
        raise ConfigError(f"--classes picks shapes of the built-in dataset; {name} has the classes of its folders")
    if placement != "anywhere":
        raise ConfigError(
            f"--placement places the built-in dataset's objects; {name}'s lie where they were photographed"
        )
    read, layout = FILE_DATASETS[name]
    if root is None:
        raise LayoutError(f"{name}: give the dataset folder with --data ROOT; expected layout:\n{layout}")
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{name}: {root} is not a folder; expected layout:\n{layout}")
    listing = read(root, everything=True) if everything and name == "folder" else read(root)
    if (not listing.train and not everything) or not listing.val:
        raise LayoutError(
            f"{name}: {root} has {len(listing.train)} training and {len(listing.val)} val "
            f"images; both splits need some; expected layout:\n{layout}"
        )
    size = image_size or FILE_IMAGE_SIZE
    kw = dict(image_size=size, strict=strict)
    train = ImageFiles(listing.root, listing.train, listing.classes, train=True, ce_scale=ce_crop_scale, **kw)
    val = ImageFiles(listing.root, listing.val, listing.classes, boxes=listing.val_boxes, **kw)
    return DataBundle(train, val, listing.classes, size, in_memory=False)


#: data settings taken from a run's config unless overridden (:func:`build_for_run`)
RUN_DATA_ARGS = ("dataset", "data", "image_size", "train_size", "val_size", "num_classes", "seed", "placement")


def build_for_run(train_args: dict, overrides: dict | None = None, *, everything: bool = False) -> DataBundle:
    """The dataset a run trained on (``train_args``: its config's values) with ``overrides``
    (None values: not given). Only the arguments that :func:`build` accepts are passed
    (``data`` also as ``root``), so datasets added to it need no change here; a run trained on
    a subset of the built-in shapes (``classes``) gets the same subset."""
    chosen = {k: train_args.get(k) for k in RUN_DATA_ARGS}
    chosen.update({k: v for k, v in (overrides or {}).items() if k in RUN_DATA_ARGS and v is not None})
    chosen["root"] = chosen["data"]
    if train_args.get("classes") and chosen["dataset"] == train_args.get("dataset"):
        chosen["classes"] = list(train_args["classes"])
    accepted = inspect.signature(build).parameters
    kwargs = {k: v for k, v in chosen.items() if k in accepted and k != "name" and v is not None}
    return build(chosen["dataset"], everything=everything, **kwargs)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] (any device) -> float32 normalized with :data:`MEAN`/:data:`STD`."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, to [0, 1] floats for pictures."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def annotated_batches(dataset, batch_size: int, *, workers: int = 0):
    """``(images uint8, labels, boxes)`` batches of a dataset with box annotations, in order;
    file datasets are decoded by ``workers`` processes and unreadable images left out."""
    if not hasattr(dataset, "boxes"):
        raise ValueError(f"{type(dataset).__name__} has no box annotations")
    if not isinstance(dataset, ImageFiles):
        for start in range(0, len(dataset), batch_size):
            sl = slice(start, start + batch_size)
            yield dataset.images[sl], dataset.labels[sl], dataset.boxes[sl]
        return
    loader = torch.utils.data.DataLoader(
        dataset.annotated(), batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available()
    )
    for batch in loader:
        (images, labels, boxes), _ = drop_unreadable(batch)
        if len(labels):
            yield images, labels, boxes
