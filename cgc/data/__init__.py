"""Datasets by name. Every dataset yields ``(image uint8 [3,S,S], label)`` pairs of one
fixed size ``S``; normalization and the augmented views are made on the device.

File datasets (``folder``, ``imagenet``, ``cub``, ``cars``, ``flowers``, ``aircraft``) decode
and resize in loader workers; their training split yields ``(x_orig, label, x_ce)`` with the
cross-entropy view cut from the decoded image (see :mod:`cgc.data.image_files`), and a sample whose
file cannot be decoded comes with the label :data:`UNREADABLE` (see :func:`drop_unreadable`).

A dataset with ground truth for explanations has a ``boxes`` attribute; read it with
:func:`annotated_batches`, which gives the boxes [B,nb,4] as (x0, y0, x1, y1) in pixels of the
image as fed to the model (empty boxes padded with zeros). The built-in dataset also has
``masks`` [N,S,S].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import ConfigError, UnknownName
from ..settings import Settings, area_range, at_least, fraction, setting
from ..transforms import CE_SCALE
from . import finegrained, folders, synthetic
from .image_files import NO_LABEL, UNREADABLE, ImageFiles, LayoutError, UnreadableImage, drop_unreadable
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
    "DataConfig",
    "ImageFiles",
    "LayoutError",
    "UnreadableImage",
    "WithIndex",
    "WithoutLabels",
    "annotated_batches",
    "base_dataset",
    "build",
    "build_for_run",
    "build_from",
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


GROUP = "data"


@dataclasses.dataclass(frozen=True)
class DataConfig(Settings):
    """What a run trains and validates on (see each setting's doc): :func:`build_from`."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP,)

    dataset: str = setting(
        "synthetic",
        "the dataset: synthetic is built in (no files), the others read --data ROOT",
        GROUP,
        choices=DATASETS,
    )
    root: str | None = setting(
        None, "root folder of a file dataset", GROUP, flag="--data", metavar="ROOT", aliases=("data",)
    )
    strict: bool = setting(False, "stop at the first unreadable image instead of skipping it", GROUP)
    samples_per_class: int | None = setting(
        None,
        "train on N images per class (class-balanced, fixed by --seed; list in OUT/train_files.txt)",
        GROUP,
        check=at_least(1),
        metavar="N",
    )
    train_fraction: float | None = setting(
        None,
        "train on a fraction F of each class (class-balanced, fixed by --seed)",
        GROUP,
        check=fraction,
        metavar="F",
    )
    unlabeled: str | None = setting(
        None,
        "a tree of images whose CGC term (target: the predicted class) is added to CE on the labeled set; "
        "'rest': the training images --samples-per-class/--train-fraction left out; 'all': every training image",
        GROUP,
        metavar="DIR",
    )
    unlabeled_batch_size: int | None = setting(
        None, "batch of unlabeled images (default: --batch-size)", GROUP, check=at_least(2)
    )
    image_size: int | None = setting(
        None, "input size in pixels (default: the dataset's, 64 built in, 224 files)", GROUP, check=at_least(8)
    )
    train_size: int = setting(6000, "built-in dataset: training images", GROUP, check=at_least(1))
    val_size: int = setting(1000, "built-in dataset: validation images", GROUP, check=at_least(1))
    num_classes: int = setting(10, "built-in dataset: number of shape classes (2-12)", GROUP, check=at_least(2))
    classes: tuple[str, ...] | None = setting(
        None,
        "built-in dataset: the shapes to classify, comma-separated (default: the first --num-classes)",
        GROUP,
        metavar="NAMES",
    )
    placement: str = setting(
        "anywhere",
        "built-in dataset: where the class object lies: anywhere it fits, or centered as in photographs "
        "(centers within a few pixels of the image's)",
        GROUP,
        choices=synthetic.PLACEMENTS,
    )
    workers: int | None = setting(
        None, "data-loader worker processes (default: 0 for in-memory datasets, else 4)", GROUP, check=at_least(0)
    )
    ce_crop_scale: tuple[float, float] = setting(
        CE_SCALE,
        "area range of the cross-entropy view's crop (0.08 1 is the recipe)",
        GROUP,
        check=area_range,
        metavar=("MIN", "MAX"),
    )

    @property
    def class_count(self) -> int | None:
        """How many classes the built-in dataset will have (None: a file dataset's folders say)."""
        if self.dataset != "synthetic":
            return None
        return len(self.classes) if self.classes else self.num_classes

    @property
    def limited(self) -> bool:
        """Whether the run trains on a class-balanced subset."""
        return bool(self.samples_per_class or self.train_fraction)

    def relations(self) -> list[str]:
        found = []
        if self.dataset == "synthetic":
            if self.classes is not None:
                try:
                    synthetic.class_names(classes=self.classes)
                except ConfigError as err:
                    found.append(f"--classes: {err}")
            elif self.num_classes > len(synthetic.CLASS_SHAPES):
                found.append(f"--num-classes must be in [2, {len(synthetic.CLASS_SHAPES)}], got {self.num_classes}")
        elif self.dataset in FILE_DATASETS:
            layout = FILE_DATASETS[self.dataset][1]
            if self.root is None:
                found.append(
                    f"--dataset {self.dataset} needs --data ROOT (the dataset's folder); expected layout:\n{layout}"
                )
            elif not Path(self.root).is_dir():
                found.append(f"--data {self.root} is not a folder; expected layout of {self.dataset}:\n{layout}")
            if self.classes is not None:
                found.append(
                    f"--classes picks shapes of the built-in dataset; {self.dataset} has the classes of its folders"
                )
        if self.samples_per_class is not None and self.train_fraction is not None:
            found.append("give --samples-per-class or --train-fraction, not both")
        if self.unlabeled is not None:
            if self.unlabeled == "rest" and not self.limited:
                found.append("--unlabeled rest needs --samples-per-class or --train-fraction (the rest of what?)")
            if self.unlabeled not in ("rest", "all") and not Path(self.unlabeled).is_dir():
                found.append(f"--unlabeled {self.unlabeled} is not a folder (or 'rest' / 'all')")
        return found


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


def build_from(config: DataConfig, *, seed: int = 0, everything: bool = False) -> DataBundle:
    """The dataset of a run's data section (``seed``: the run's; ``everything``: see
    :func:`build`)."""
    return build(
        config.dataset,
        seed=seed,
        image_size=config.image_size,
        train_size=config.train_size,
        val_size=config.val_size,
        num_classes=config.num_classes,
        root=config.root,
        strict=config.strict,
        ce_crop_scale=config.ce_crop_scale,
        everything=everything,
        classes=list(config.classes) if config.classes else None,
        placement=config.placement,
    )


#: the data settings an evaluation may change from a run's (:func:`build_for_run`)
RUN_DATA_ARGS = ("dataset", "root", "image_size", "train_size", "val_size", "num_classes", "placement")


def build_for_run(
    config: DataConfig, seed: int, overrides: dict | None = None, *, everything: bool = False
) -> DataBundle:
    """The dataset a run trained on (its data section and ``seed``) with ``overrides`` of
    :data:`RUN_DATA_ARGS` and ``seed`` (None values: not given); a run trained on a subset of the
    built-in shapes (``classes``) gets the same subset when the dataset stays the same."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    changed = config.replace(**{k: v for k, v in overrides.items() if k in RUN_DATA_ARGS})
    if changed.dataset != config.dataset:
        changed = changed.replace(classes=None)
    return build_from(changed, seed=overrides.get("seed", seed), everything=everything)


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
