"""Fine-grained datasets in their official layouts: ``cub`` (CUB-200-2011, with boxes),
``cars`` (Stanford Cars), ``flowers`` (Flowers-102) and ``aircraft`` (FGVC-Aircraft).

``cars`` and ``aircraft`` are read by torchvision's dataset classes (``download=False``); we
take their sample lists and decode the files ourselves. Flowers-102 has the layout that
torchvision's ``Flowers102`` reads, but that class insists on the md5 sums of the original
``.mat`` files, so it is parsed here. Splits: the official training images (train + val
where the dataset has both) train, the official test images are ``val``.
"""

from __future__ import annotations

from pathlib import Path

from .folders import Listing
from .image_files import LayoutError

CUB_LAYOUT = """\
  ROOT/ (CUB_200_2011/ or its parent)
    images/<class folder>/<image>.jpg
    images.txt              <image id> <path under images/>
    image_class_labels.txt  <image id> <class id, 1-based>
    train_test_split.txt    <image id> <1: train, 0: test>
    bounding_boxes.txt      <image id> <x> <y> <width> <height>
    classes.txt             <class id> <class name>"""

CARS_LAYOUT = """\
  ROOT/stanford_cars/   (as torchvision.datasets.StanfordCars reads it; needs scipy)
    devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat
    cars_train/<image>.jpg, cars_test/<image>.jpg"""

FLOWERS_LAYOUT = """\
  ROOT/flowers-102/   (as torchvision.datasets.Flowers102 reads it; needs scipy)
    jpg/image_00001.jpg ...
    imagelabels.mat   labels (1..102) of all images
    setid.mat         trnid, valid, tstid: image ids of the splits"""

AIRCRAFT_LAYOUT = """\
  ROOT/fgvc-aircraft-2013b/   (as torchvision.datasets.FGVCAircraft reads it)
    data/images/<image id>.jpg
    data/variants.txt                       the 100 class names
    data/images_variant_trainval.txt, data/images_variant_test.txt   <image id> <variant>"""


def _parent_of(root: Path, folder: str) -> Path:
    """torchvision's root (the parent of the dataset folder), also when given the folder itself."""
    return root.parent if root.name == folder and not (root / folder).is_dir() else root


def _read_table(path: Path, columns: int, layout: str) -> dict[int, list[str]]:
    """``{id: [fields]}`` of a whitespace-separated CUB metadata file."""
    if not path.is_file():
        raise LayoutError(f"cub: {path} is missing; expected layout:\n{layout}")
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns or not fields[0].isdigit():
            raise LayoutError(
                f"cub: {path}, line {n}: expected {columns} fields starting with an image or "
                f"class id, got {line!r}; expected layout:\n{layout}"
            )
        table[int(fields[0])] = fields[1:]
    return table


def cub(root: Path) -> Listing:
    """CUB-200-2011: official train/test split, one bounding box per image."""
    if (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    if not (root / "images").is_dir():
        raise LayoutError(f"cub: {root / 'images'} is not a folder; expected layout:\n{CUB_LAYOUT}")
    names = _read_table(root / "images.txt", 2, CUB_LAYOUT)
    labels = _read_table(root / "image_class_labels.txt", 2, CUB_LAYOUT)
    split = _read_table(root / "train_test_split.txt", 2, CUB_LAYOUT)
    boxes = _read_table(root / "bounding_boxes.txt", 5, CUB_LAYOUT)
    class_table = _read_table(root / "classes.txt", 2, CUB_LAYOUT)
    classes = [class_table[k][0] for k in sorted(class_table)]
    class_index = {k: i for i, k in enumerate(sorted(class_table))}
    train, val, val_boxes = [], [], []
    for image_id in sorted(names):
        try:
            label = class_index[int(labels[image_id][0])]
            is_train = split[image_id][0] == "1"
            x, y, w, h = (float(v) for v in boxes[image_id])
        except (KeyError, ValueError) as err:
            raise LayoutError(
                f"cub: image id {image_id} of images.txt lacks a valid class, split or box "
                f"({err!r}); expected layout:\n{CUB_LAYOUT}"
            ) from err
        sample = (root / "images" / names[image_id][0], label)
        if is_train:
            train.append(sample)
        else:
            val.append(sample)
            val_boxes.append([[x, y, x + w, y + h]])
    return Listing(root, classes, train, val, val_boxes)


def cars(root: Path) -> Listing:
    """Stanford Cars through ``torchvision.datasets.StanfordCars``."""
    from torchvision.datasets import StanfordCars

    tv_root = _parent_of(root, "stanford_cars")
    try:
        splits = [StanfordCars(str(tv_root), split=s, download=False) for s in ("train", "test")]
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise LayoutError(f"cars: cannot read {tv_root} ({err}); expected layout:\n{CARS_LAYOUT}") from err
    train, val = ([(Path(p), int(label)) for p, label in ds._samples] for ds in splits)
    return Listing(tv_root / "stanford_cars", [str(c) for c in splits[0].classes], train, val)


def flowers(root: Path) -> Listing:
    """Flowers-102: ``trnid`` + ``valid`` train, ``tstid`` is val."""
    from scipy.io import loadmat

    base = _parent_of(root, "flowers-102") / "flowers-102"
    try:
        labels = loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"].tolist()
        ids = loadmat(str(base / "setid.mat"), squeeze_me=True)
        splits = [ids["trnid"].tolist() + ids["valid"].tolist(), ids["tstid"].tolist()]
    except (OSError, KeyError, ValueError) as err:
        raise LayoutError(
            f"flowers: cannot read the labels and splits in {base} ({err!r}); expected layout:\n{FLOWERS_LAYOUT}"
        ) from err
    if not (base / "jpg").is_dir():
        raise LayoutError(f"flowers: {base / 'jpg'} is not a folder; expected layout:\n{FLOWERS_LAYOUT}")
    num_classes = max(labels)
    try:
        train, val = (
            [(base / "jpg" / f"image_{i:05d}.jpg", labels[i - 1] - 1) for i in sorted(split)] for split in splits
        )
    except IndexError as err:
        raise LayoutError(
            f"flowers: setid.mat names an image id beyond imagelabels.mat ({len(labels)} labels)"
        ) from err
    return Listing(base, [str(c) for c in range(1, num_classes + 1)], train, val)


def aircraft(root: Path) -> Listing:
    """FGVC-Aircraft (100 variants) through ``torchvision.datasets.FGVCAircraft``: trainval
    trains, test is val."""
    from torchvision.datasets import FGVCAircraft

    tv_root = _parent_of(root, "fgvc-aircraft-2013b")
    try:
        splits = [
            FGVCAircraft(str(tv_root), split=s, annotation_level="variant", download=False)
            for s in ("trainval", "test")
        ]
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise LayoutError(f"aircraft: cannot read {tv_root} ({err!r}); expected layout:\n{AIRCRAFT_LAYOUT}") from err
    train, val = ([(Path(p), int(label)) for p, label in zip(ds._image_files, ds._labels)] for ds in splits)
    return Listing(tv_root / "fgvc-aircraft-2013b", list(splits[0].classes), train, val)
