"""Class-per-folder datasets: ``folder`` (any tree; with a folder of Pascal-VOC XML files, the
boxes of its images) and ``imagenet`` (with optional Pascal-VOC XML boxes for the validation
images).

Each function reads a root and returns a :class:`Listing` (file names, labels, class names,
boxes); :func:`cgc.data.build` turns listings into datasets. Class folders are read with
torchvision's ``find_classes`` / ``make_dataset`` (sorted, so labels are reproducible).
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .image_files import LayoutError

#: share of each class that goes to val when a ``folder`` root is a single tree
VAL_FRACTION = 0.2

FOLDER_LAYOUT = """\
  ROOT/train/<class>/<image>   and   ROOT/val/<class>/<image>   (same class names), or
  ROOT/<class>/<image>         a single tree, split per class: 20 % val, chosen by file name
                               (evaluating a model that was not trained on it: every image), or
  ROOT/<image>                 flat, for evaluation, each image's class named by its XML below
  ROOT/annotation/<image stem>.xml   optional (or ROOT/Annotations/): Pascal-VOC boxes of the images,
                               for the content heatmap and the pointing game"""
#: where a folder dataset keeps its Pascal-VOC files (the second is VOC's own name)
ANNOTATION_DIRS = ("annotation", "Annotations")

IMAGENET_LAYOUT = """\
  ROOT/train/<wnid>/<image>          one folder per class (1000 for ImageNet-1k)
  ROOT/val/<wnid>/<image>            the same class folders, or flat: ROOT/val/<image>
  ROOT/annotation/<image stem>.xml   optional: one Pascal-VOC XML per val image (ImageNet's
                                     ILSVRC2012_bbox_val_v3, e.g. ILSVRC2012_val_00000001.xml),
                                     its <object>s give the boxes for the content-heatmap metric
                                     and, when val/ is flat, the label (<name> = a train folder)"""


@dataclass
class Listing:
    """What a dataset root holds: ``(path, label)`` samples per split, class names, and the
    val boxes (one list of [x0, y0, x1, y1] in file pixels per val image) when annotated."""

    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    val_boxes: list[list[list[float]]] | None = None


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def class_tree(root: Path, dataset: str, layout: str, class_to_idx: dict[str, int] | None = None):
    """``(classes, samples)`` of a class-per-folder tree (an annotation folder is not a class);
    with ``class_to_idx`` the folders must be among those classes (a val tree may miss some)."""
    try:
        if class_to_idx is None:
            classes = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in ANNOTATION_DIRS)
            if not classes:
                raise FileNotFoundError(f"no class folders in {root}")
            class_to_idx = {c: i for i, c in enumerate(classes)}
        else:
            classes = list(class_to_idx)
            unknown = sorted(
                d.name
                for d in root.iterdir()
                if d.is_dir() and d.name not in class_to_idx and d.name not in ANNOTATION_DIRS
            )
            if unknown:
                raise LayoutError(
                    f"{dataset}: {root} has class folders that train/ lacks: {unknown[:5]}; expected layout:\n{layout}"
                )
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as err:
        raise LayoutError(f"{dataset}: {err}; expected layout:\n{layout}") from err
    if not samples:
        raise LayoutError(
            f"{dataset}: no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of "
            f"{root}; expected layout:\n{layout}"
        )
    return classes, [(Path(p), label) for p, label in samples]


def _require_dir(path: Path, dataset: str, layout: str) -> None:
    if not path.is_dir():
        raise LayoutError(f"{dataset}: {path} is not a folder; expected layout:\n{layout}")


def _name_key(path: Path) -> str:
    """A stable pseudo-random order of file names (independent of --seed and of the OS)."""
    return hashlib.sha1(path.name.encode()).hexdigest()


def folder(root: Path, *, everything: bool = False) -> Listing:
    """A class-per-folder tree: ``train/`` + ``val/`` subtrees, or one tree split per class
    (every class with at least two images gives ``VAL_FRACTION`` of them, at least one, to
    val; which ones depends only on the file names, so every seed sees the same val set).
    ``everything`` (evaluating a model trained elsewhere): every image of a single tree is a
    val image, and a flat folder of images is accepted, each image's class being the first
    ``<object><name>`` of its XML. With an ``annotation/`` (or ``Annotations/``) folder, the val
    images get their Pascal-VOC boxes (every val image needs its XML)."""
    _require_dir(root, "folder", FOLDER_LAYOUT)
    annotations = next((root / d for d in ANNOTATION_DIRS if (root / d).is_dir()), None)
    flat = sorted(p for p in root.iterdir() if p.is_file() and is_image(p))
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train = class_tree(root / "train", "folder", FOLDER_LAYOUT)
        _, val = class_tree(root / "val", "folder", FOLDER_LAYOUT, {c: i for i, c in enumerate(classes)})
    elif flat and everything:
        if annotations is None:
            raise LayoutError(
                f"folder: {root} holds images directly but has no annotation/ folder: flat images "
                f"take their class from their XML; expected layout:\n{FOLDER_LAYOUT}"
            )
        named = [(p, voc_names(_xml_of(annotations, p))) for p in flat]
        classes = sorted({names[0] for _, names in named if names})
        lost = [p.name for p, names in named if not names]
        if lost:
            raise LayoutError(f"folder: the XML of {lost[:3]} names no object; expected layout:\n{FOLDER_LAYOUT}")
        train, val = [], [(p, classes.index(names[0])) for p, names in named]
    else:
        classes, samples = class_tree(root, "folder", FOLDER_LAYOUT)
        if everything:
            train, val = [], samples
        else:
            train, val = [], []
            for label in range(len(classes)):
                files = sorted((s for s in samples if s[1] == label), key=lambda s: _name_key(s[0]))
                n_val = max(1, round(VAL_FRACTION * len(files))) if len(files) >= 2 else 0
                val += files[:n_val]
                train += files[n_val:]
            train, val = sorted(train), sorted(val)
    boxes = None
    if annotations is not None:
        boxes = [_class_boxes(_xml_of(annotations, path), classes[label]) for path, label in val]
    return Listing(root, classes, train, val, boxes)


def _xml_of(annotations: Path, image: Path) -> Path:
    xml = annotations / f"{image.stem}.xml"
    if not xml.is_file():
        raise LayoutError(
            f"folder: {xml} is missing; with an annotation folder every evaluated image needs its "
            f"Pascal-VOC XML; expected layout:\n{FOLDER_LAYOUT}"
        )
    return xml


def voc_names(path: Path) -> list[str]:
    """The ``<object><name>`` entries of a Pascal-VOC file."""
    return read_voc_boxes(path)[0]


def _class_boxes(path: Path, name: str) -> list[list[float]]:
    """The boxes of the objects called ``name`` (the image's class), or of all objects when
    none is called so (class folders named differently from the annotation's labels)."""
    names, boxes = read_voc_boxes(path)
    mine = [b for n, b in zip(names, boxes) if n == name]
    return mine or boxes


def read_voc_boxes(path: Path) -> tuple[list[str], list[list[float]]]:
    """Object names and boxes ``[xmin, ymin, xmax, ymax]`` of a Pascal-VOC XML file."""
    try:
        tree = ET.parse(path)
        names, boxes = [], []
        size = tree.getroot().find("size")
        width, height = (
            (float(size.findtext(k)) for k in ("width", "height"))
            if size is not None and size.findtext("width")
            else (float("inf"), float("inf"))
        )
        for obj in tree.getroot().iter("object"):
            bb = obj.find("bndbox")
            names.append(obj.findtext("name").strip())
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise LayoutError(
            f"{path} is not a Pascal-VOC annotation with <object><name> and <bndbox> xmin/ymin/xmax/ymax ({err})"
        ) from err
    for box in boxes:
        if not (box[2] > box[0] and box[3] > box[1]) or min(box) < 0:
            raise LayoutError(f"{path}: box {box} is not xmin < xmax, ymin < ymax with non-negative pixels")
        if box[0] >= width or box[1] >= height or box[2] > width + 1 or box[3] > height + 1:
            raise LayoutError(f"{path}: box {box} lies outside the {width:g} x {height:g} image its <size> gives")
    return names, boxes


def imagenet(root: Path) -> Listing:
    """ImageNet-style train/ and val/ class folders, optionally boxes from ``annotation/``."""
    _require_dir(root / "train", "imagenet", IMAGENET_LAYOUT)
    _require_dir(root / "val", "imagenet", IMAGENET_LAYOUT)
    classes, train = class_tree(root / "train", "imagenet", IMAGENET_LAYOUT)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    annotations = root / "annotation"
    flat = sorted(p for p in (root / "val").iterdir() if p.is_file() and is_image(p))
    if flat and not annotations.is_dir():
        raise LayoutError(
            f"imagenet: {root / 'val'} holds images directly but {annotations} is missing: "
            f"flat val images take their labels from the XML files; expected layout:\n"
            f"{IMAGENET_LAYOUT}"
        )
    if not flat:
        _, val = class_tree(root / "val", "imagenet", IMAGENET_LAYOUT, class_to_idx)
        if not annotations.is_dir():
            return Listing(root, classes, train, val)
    boxes, labeled = [], []
    for path, label in [(p, None) for p in flat] or val:
        xml = annotations / f"{path.stem}.xml"
        if not xml.is_file():
            raise LayoutError(
                f"imagenet: {xml} is missing; with annotation/ every val image needs its XML; "
                f"expected layout:\n{IMAGENET_LAYOUT}"
            )
        names, image_boxes = read_voc_boxes(xml)
        if label is None:
            if not names or names[0] not in class_to_idx:
                raise LayoutError(
                    f"imagenet: {xml} names no class of train/ (first <object><name>: {names[0] if names else 'none'})"
                )
            label = class_to_idx[names[0]]
        labeled.append((path, label))
        boxes.append(image_boxes)
    return Listing(root, classes, train, labeled, boxes)
