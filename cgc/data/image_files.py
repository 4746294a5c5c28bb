"""Datasets of image files: decoding and the fixed-size views, done in loader worker processes.

Every image is decoded with PIL (as RGB) and turned into uint8 tensors of one size ``S``:

- ``x_orig``: Resize(shorter side ``S * 256 / 224``) + CenterCrop(``S``), the view that is
  evaluated and explained (the augmented view ``x_aug`` is cut from it on the device);
- ``x_ce`` (training only): RandomResizedCrop(``S``) + horizontal flip of the decoded image,
  the cross-entropy view of the reference recipe (docs/method.md), drawn from a key of (seed,
  epoch, sample index) (:meth:`ImageFiles.set_epoch`): the same crop for an image whatever the
  loader workers and processes.

Boxes (x0, y0, x1, y1 in pixels of the file) are mapped through the resize and the crop into
pixels of ``x_orig``. An image that cannot be decoded is skipped: a warning names it and the
sample comes back with the label :data:`UNREADABLE` (and zero pixels, so batches keep their
shape); :func:`drop_unreadable` removes such rows after collation and counts them. With
``strict=True`` the first unreadable image raises :class:`UnreadableImage` instead.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import CGCError
from ..transforms import DEFAULT_RATIO, TRIES, boxes_from_uniforms, sample_keys, uniforms

#: label of an image without one (unlabeled data)
NO_LABEL = -1
#: label of a sample whose image could not be decoded; such rows are dropped from batches
UNREADABLE = -2


class LayoutError(CGCError, ValueError):
    """A dataset root that is missing or does not have the expected layout."""


class UnreadableImage(CGCError, RuntimeError):
    """An image file that cannot be decoded, raised in strict mode."""


def resize_size(image_size: int) -> int:
    """Shorter side before the center crop: 256 for 224, the same ratio for other sizes."""
    return round(image_size * 256 / 224)


def drop_unreadable(batch):
    """``(batch, n)``: a collated batch (a sequence whose second element is the labels)
    without its :data:`UNREADABLE` rows, and how many rows were removed."""
    bad = batch[1] == UNREADABLE
    n = int(bad.sum())
    if n:
        keep = ~bad
        batch = [t[keep] for t in batch]
    return batch, n


class ImageFiles(torch.utils.data.Dataset):
    """Labeled (or :data:`NO_LABEL`) image files as fixed-size uint8 views.

    Items: ``(x_orig, label)``; with ``train=True`` ``(x_orig, label, x_ce)``; from
    :meth:`annotated` ``(x_orig, label, boxes [max_boxes, 4])`` with zero rows as padding.
    ``root`` is where the relative names of :meth:`name` start (the dataset folder).
    """

    def __init__(
        self,
        root: Path,
        samples: list[tuple[Path, int]],
        classes: list[str],
        image_size: int,
        *,
        train: bool = False,
        ce_scale: tuple[float, float] = (0.08, 1.0),
        boxes: list[list[list[float]]] | None = None,
        strict: bool = False,
    ):
        self.root = Path(root)
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.image_size = image_size
        self.train = train
        self.ce_scale = tuple(ce_scale)
        self.strict = strict
        self.with_boxes = False
        self.seed = self.epoch = 0
        if boxes is not None:
            if len(boxes) != len(samples):
                raise ValueError(f"{len(boxes)} box lists for {len(samples)} images")
            self.boxes = boxes
            self.max_boxes = max((len(b) for b in boxes), default=0) or 1

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        """The file of sample ``index`` relative to the dataset root (as saved in file lists)."""
        path = Path(self.samples[index][0])
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Key the x_ce crops of the coming epoch by (``seed``, ``epoch``, sample index)."""
        self.epoch, self.seed = epoch, seed

    def select(self, indices) -> ImageFiles:
        """The samples ``indices`` (with their boxes), e.g. one process's share for evaluation."""
        view = copy.copy(self)
        view.samples = [self.samples[i] for i in indices]
        view.targets = [self.targets[i] for i in indices]
        if hasattr(self, "boxes"):
            view.boxes = [self.boxes[i] for i in indices]
        return view

    def annotated(self) -> ImageFiles:
        """The same samples, each with its boxes in pixels of ``x_orig``."""
        if not hasattr(self, "boxes"):
            raise ValueError(f"this dataset ({self.root}) has no box annotations")
        view = copy.copy(self)
        view.train, view.with_boxes = False, True
        return view

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image, original_size = self._decode(path)
        except Exception as err:
            if self.strict:
                raise UnreadableImage(f"cannot read image {path}: {err} (drop --strict to skip such files)") from err
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
            return self._placeholder()
        x, mapping = self._center_view(image)
        if self.train:
            return x, label, self._ce_view(image, index)
        if self.with_boxes:
            return x, label, self._map_boxes(self.boxes[index], original_size, mapping)
        return x, label

    def _decode(self, path) -> tuple[Image.Image, tuple[int, int]]:
        """RGB image and its size in the file; outside training, JPEGs are decoded at a reduced
        scale (PIL draft mode) that still covers the resize, which is much faster."""
        with Image.open(path) as im:
            size = im.size
            if not self.train:
                r = resize_size(self.image_size) / min(size)
                if r < 1:
                    im.draft("RGB", (math.ceil(size[0] * r), math.ceil(size[1] * r)))
            return im.convert("RGB"), size

    def _center_view(self, image: Image.Image):
        """Resize + center crop; also the (sx, sy, left, top) map from decoded pixels."""
        s = self.image_size
        resized = TF.resize(image, resize_size(s), interpolation=InterpolationMode.BILINEAR, antialias=True)
        w, h = resized.size
        left, top = round((w - s) / 2.0), round((h - s) / 2.0)
        x = TF.pil_to_tensor(TF.crop(resized, top, left, s, s))
        return x, (w, h, left, top)

    def _ce_view(self, image: Image.Image, index: int) -> torch.Tensor:
        s = self.image_size
        u = uniforms(1, 3 * TRIES + 2, keys=sample_keys(self.seed, self.epoch, [index], "ce"))
        top, left, h, w = (
            int(v)
            for v in boxes_from_uniforms(
                u[:, :-1], image.height, image.width, scale=self.ce_scale, ratio=DEFAULT_RATIO
            )[0]
        )
        crop = TF.resized_crop(image, top, left, h, w, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if u[0, -1] < 0.5:
            crop = TF.hflip(crop)
        return TF.pil_to_tensor(crop)

    def _map_boxes(self, boxes, original_size, mapping) -> torch.Tensor:
        """Boxes in file pixels -> pixels of x_orig, clipped to it; boxes cut away entirely and
        the padding rows are zeros."""
        w, h, left, top = mapping
        out = torch.zeros(self.max_boxes, 4)
        if boxes:
            b = torch.tensor(boxes, dtype=torch.float32)
            sx, sy = w / original_size[0], h / original_size[1]
            b = (b * torch.tensor([sx, sy, sx, sy]) - torch.tensor([left, top, left, top])).clamp(0, self.image_size)
            visible = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            out[: len(b)] = b * visible[:, None]
        return out

    def _placeholder(self):
        s = self.image_size
        blank = torch.zeros(3, s, s, dtype=torch.uint8)
        if self.train:
            return blank, UNREADABLE, blank.clone()
        if self.with_boxes:
            return blank, UNREADABLE, torch.zeros(self.max_boxes, 4)
        return blank, UNREADABLE
