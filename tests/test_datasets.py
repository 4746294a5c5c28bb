"""File datasets on tiny trees generated in each official layout: counts, labels, splits,
boxes, limited-data subsets, unreadable files, wrong roots, and one-epoch training on each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image, ImageDraw

from cgc import data, train
from cgc.data import subsets
from cgc.train_config import TrainConfig

#: (width, height) of the generated images: not square, so resize and crop both matter
SIZE = (80, 60)
#: the term on from the first step (no gate): a one-epoch toy run would otherwise never reach it
TOY = TrainConfig().replace(image_size=32, batch_size=4, epochs=1, workers=0, arch="compact", overlays=4, term_gate=0.0)


def jpeg(path, label: int, box=None, size=SIZE):
    """A JPEG whose color tells its class; ``box`` (x0, y0, x1, y1) is drawn white on black."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if box is None:
        image = Image.new("RGB", size, ((60 * label) % 256, (120 + 50 * label) % 256, 200))
        ImageDraw.Draw(image).ellipse([10 + 5 * label, 10, 40 + 5 * label, 45], fill=(255, 255, 255))
    else:
        image = Image.new("RGB", size, (0, 0, 0))
        ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    image.save(path, quality=95)


def make_cub(root, per_class=(3, 2)):
    """CUB_200_2011 with 3 classes; ``per_class`` = (train, test) images per class."""
    base = root / "CUB_200_2011"
    rows = {"images": [], "labels": [], "split": [], "boxes": []}
    image_id = 0
    for c in range(3):
        for k in range(sum(per_class)):
            image_id += 1
            name = f"{c + 1:03d}.class_{c}/img_{k}.jpg"
            box = (8 + 4 * c, 6 + 2 * k, 50 + 4 * c, 40 + k)
            jpeg(base / "images" / name, c, box)
            rows["images"].append(f"{image_id} {name}")
            rows["labels"].append(f"{image_id} {c + 1}")
            rows["split"].append(f"{image_id} {int(k < per_class[0])}")
            x0, y0, x1, y1 = box
            rows["boxes"].append(f"{image_id} {x0}.0 {y0}.0 {x1 - x0}.0 {y1 - y0}.0")
    for key, fname in (
        ("images", "images.txt"),
        ("labels", "image_class_labels.txt"),
        ("split", "train_test_split.txt"),
        ("boxes", "bounding_boxes.txt"),
    ):
        (base / fname).write_text("\n".join(rows[key]) + "\n")
    (base / "classes.txt").write_text("".join(f"{c + 1} {c + 1:03d}.class_{c}\n" for c in range(3)))
    return root


def make_cars(root):
    """stanford_cars/ with 2 classes, 3 train and 2 test images each."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(["Audi A", "BMW B"], dtype=object)})
    for split, n, mat in (
        ("train", 3, base / "devkit" / "cars_train_annos.mat"),
        ("test", 2, base / "cars_test_annos_withlabels.mat"),
    ):
        ann = np.zeros(2 * n, dtype=[("fname", "O"), ("class", "O")])
        for i in range(2 * n):
            jpeg(base / f"cars_{split}" / f"{i:05d}.jpg", i % 2)
            ann[i] = (f"{i:05d}.jpg", np.array(i % 2 + 1, dtype=np.uint8))
        sio.savemat(mat, {"annotations": ann})
    return root


def make_flowers(root):
    """flowers-102/ with 3 classes: ids 1-6 train, 7-9 val, 10-15 test."""
    base = root / "flowers-102"
    labels = [(i % 3) + 1 for i in range(15)]
    for i, label in enumerate(labels, 1):
        jpeg(base / "jpg" / f"image_{i:05d}.jpg", label - 1)
    sio.savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)})
    sio.savemat(base / "setid.mat", {"trnid": np.arange(1, 7), "valid": np.arange(7, 10), "tstid": np.arange(10, 16)})
    return root


def make_aircraft(root):
    """fgvc-aircraft-2013b/ with 2 variants, 4 trainval and 2 test images each."""
    base = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A320"]
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, n in (("trainval", 4), ("test", 2)):
        lines = []
        for i in range(2 * n):
            image_id = f"{split[:2]}{i:05d}"
            jpeg(base / "images" / f"{image_id}.jpg", i % 2)
            lines.append(f"{image_id} {variants[i % 2]}")
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def voc_xml(path, name, boxes):
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{SIZE[0]}</width><height>{SIZE[1]}</height></size>{objects}</annotation>"
    )


def make_imagenet(root, flat_val=True):
    """train/<wnid>/ with 2 classes x 4 images; val flat + annotation/*.xml (2 per class)."""
    wnids = ["n01440764", "n01443537"]
    for c, wnid in enumerate(wnids):
        for k in range(4):
            jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", c)
        for k in range(2):
            stem = f"ILSVRC2012_val_{2 * c + k + 1:08d}"
            box = (30, 10 + 5 * k, 70, 50)
            jpeg(root / "val" / (f"{stem}.JPEG" if flat_val else f"{wnid}/{stem}.JPEG"), c, box)
            if flat_val:
                voc_xml(root / "annotation" / f"{stem}.xml", wnid, [box])
    return root


def make_folder(root, n=5, classes=("cat", "dog", "fox")):
    for c, name in enumerate(classes):
        for k in range(n):
            jpeg(root / name / f"{name}_{k}.jpg", c)
    return root


MAKERS = {
    "cub": make_cub,
    "cars": make_cars,
    "flowers": make_flowers,
    "aircraft": make_aircraft,
    "imagenet": make_imagenet,
    "folder": make_folder,
}


def test_cub_counts_labels_splits(tmp_path):
    bundle = data.build("cub", root=make_cub(tmp_path), image_size=32)
    assert bundle.classes == ["001.class_0", "002.class_1", "003.class_2"]
    assert (len(bundle.train), len(bundle.val)) == (9, 6)
    assert bundle.train.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2] and bundle.val.targets == [0, 0, 1, 1, 2, 2]
    assert all("img_3" in bundle.val.name(i) or "img_4" in bundle.val.name(i) for i in range(6))
    x_orig, label, x_ce = bundle.train[4]
    assert x_orig.shape == x_ce.shape == (3, 32, 32) and x_orig.dtype == torch.uint8 and label == 1
    x, label = bundle.val[0]
    assert x.shape == (3, 32, 32) and label == 0
    # the parent folder of CUB_200_2011 and the folder itself are both accepted
    assert len(data.build("cub", root=tmp_path / "CUB_200_2011", image_size=32).val) == 6


def test_boxes_follow_resize_and_crop(tmp_path):
    """Each val image is a white box on black: the mapped box must cover the white pixels."""
    for name, maker in (("cub", make_cub), ("imagenet", make_imagenet)):
        bundle = data.build(name, root=maker(tmp_path / name), image_size=32)
        batches = list(data.annotated_batches(bundle.val, 3))
        assert sum(len(b[1]) for b in batches) == len(bundle.val)
        for images, _labels, boxes in batches:
            assert images.shape[1:] == (3, 32, 32) and boxes.shape[1:] == (1, 4)
            for image, box in zip(images, boxes[:, 0]):
                bright = image.float().mean(0) > 128
                x0, y0, x1, y1 = box.tolist()
                assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
                ys, xs = torch.nonzero(bright, as_tuple=True)
                assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
                inside = bright[round(y0) + 1 : round(y1) - 1, round(x0) + 1 : round(x1) - 1]
                assert inside.float().mean() > 0.9, name


@pytest.mark.parametrize(
    "name, train_n, val_n, classes",
    [
        ("cars", 6, 4, ["Audi A", "BMW B"]),
        ("flowers", 9, 6, ["1", "2", "3"]),
        ("aircraft", 8, 4, ["707-320", "A320"]),
    ],
)
def test_torchvision_layouts(tmp_path, name, train_n, val_n, classes):
    bundle = data.build(name, root=MAKERS[name](tmp_path), image_size=32)
    assert bundle.classes == classes and (len(bundle.train), len(bundle.val)) == (train_n, val_n)
    assert not hasattr(bundle.val, "boxes")
    k = len(classes)
    # the generators give image i the label i % k (flowers: by id, 1-based)
    assert bundle.train.targets == [i % k for i in range(train_n)]
    assert bundle.val.targets == (
        [(i + 9) % 3 for i in range(val_n)] if name == "flowers" else [i % k for i in range(val_n)]
    )
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_imagenet_layouts(tmp_path):
    flat = data.build("imagenet", root=make_imagenet(tmp_path / "flat"), image_size=32)
    assert flat.classes == ["n01440764", "n01443537"] and (len(flat.train), len(flat.val)) == (8, 4)
    assert flat.val.targets == [0, 0, 1, 1] and len(flat.val.boxes) == 4
    folders = data.build("imagenet", root=make_imagenet(tmp_path / "folders", flat_val=False), image_size=32)
    assert folders.val.targets == [0, 0, 1, 1] and not hasattr(folders.val, "boxes")
    (tmp_path / "flat" / "annotation" / "ILSVRC2012_val_00000001.xml").unlink()
    with pytest.raises(data.LayoutError, match=r"ILSVRC2012_val_00000001\.xml is missing"):
        data.build("imagenet", root=tmp_path / "flat")


def test_folder_split_is_deterministic_and_stratified(tmp_path):
    root = make_folder(tmp_path / "tree")
    a, b = (data.build("folder", root=root, image_size=32, seed=s) for s in (0, 1))
    assert a.classes == ["cat", "dog", "fox"] and (len(a.train), len(a.val)) == (12, 3)
    assert [a.val.name(i) for i in range(3)] == [b.val.name(i) for i in range(3)]
    assert sorted(a.val.targets) == [0, 1, 2]
    assert not {a.train.name(i) for i in range(12)} & {a.val.name(i) for i in range(3)}
    for split in ("train", "val"):
        make_folder(tmp_path / "split" / split, n=2)
    c = data.build("folder", root=tmp_path / "split", image_size=32)
    assert (len(c.train), len(c.val)) == (6, 6) and c.val.name(0) == "val/cat/cat_0.jpg"


def test_stratified_subsets():
    targets = [i % 4 for i in range(40)] + [3] * 5  # class 3 has 15 samples, the others 10
    a = subsets.stratified_indices(targets, per_class=3, seed=7)
    assert a == subsets.stratified_indices(targets, per_class=3, seed=7)
    assert a != subsets.stratified_indices(targets, per_class=3, seed=8)
    assert sorted(targets[i] for i in a) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert set(a) <= set(subsets.stratified_indices(targets, per_class=6, seed=7))
    f = subsets.stratified_indices(targets, fraction=0.2, seed=0)
    assert [sum(targets[i] == c for i in f) for c in range(4)] == [2, 2, 2, 3]
    assert len(subsets.stratified_indices(targets, fraction=0.01, seed=0)) == 4  # at least one per class
    assert len(subsets.stratified_indices(targets, per_class=100, seed=0)) == 45
    with pytest.raises(ValueError):
        subsets.stratified_indices(targets, per_class=2, fraction=0.5)


@pytest.mark.slow
def test_subsets_of_the_builtin_dataset_and_flag_checks(tmp_path):
    bundle = data.build("synthetic", train_size=60, val_size=10, num_classes=3, image_size=32)
    subset = data.limit(bundle.train, per_class=4, seed=0)
    data.write_file_list(tmp_path / "files.txt", subset)
    lines = (tmp_path / "files.txt").read_text().splitlines()
    assert len(lines) == 12 and [line.split("\t")[0] for line in lines] == [str(i) for i in subset.indices]
    for bad in (
        {"samples_per_class": 2, "train_fraction": 0.5},
        {"train_fraction": 0.0},
        {"samples_per_class": 0},
        {"unlabeled": "x", "loss": "ce"},
        {"head_lr": -1.0},
    ):
        with pytest.raises(ValueError):
            TOY.replace(**bad).validate()


@pytest.mark.slow
def test_limited_data_run_saves_its_file_list(tmp_path):
    root = make_cub(tmp_path / "cub", per_class=(5, 2))
    lists = []
    for run in ("a", "b"):
        train.run(TOY.replace(dataset="cub", data=str(root), samples_per_class=2, seed=3, out=str(tmp_path / run)))
        lists.append((tmp_path / run / "train_files.txt").read_text().splitlines())
    assert lists[0] == lists[1] and len(lists[0]) == 6
    assert (
        sorted(line.split("\t")[1] for line in lists[0])
        == ["001.class_0"] * 2 + ["002.class_1"] * 2 + ["003.class_2"] * 2
    )
    assert all((root / "CUB_200_2011" / line.split("\t")[0]).is_file() for line in lists[0])


@pytest.mark.slow
def test_unreadable_images_are_skipped_or_stop_a_strict_run(tmp_path):
    root = tmp_path / "tree"
    make_folder(root / "train", n=5)
    make_folder(root / "val", n=1)
    (root / "train" / "cat" / "cat_9.jpg").write_bytes(b"not a jpeg at all")  # 16 files: 4 full batches
    bundle = data.build("folder", root=root, image_size=32)
    names = [bundle.train.name(i) for i in range(len(bundle.train))]
    with pytest.warns(UserWarning, match=r"cat_9\.jpg"):
        assert bundle.train[names.index("train/cat/cat_9.jpg")][1] == data.UNREADABLE
    config = TOY.replace(dataset="folder", data=str(root), loss="ce")
    with pytest.warns(UserWarning) as caught:
        train.run(config.replace(out=str(tmp_path / "run")))
    messages = [str(w.message) for w in caught]
    assert any("cat_9.jpg" in m for m in messages) and any("skipped 1 unreadable" in m for m in messages)
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert log["train_skipped"] == 1
    with pytest.raises(data.UnreadableImage, match=r"cat_9\.jpg"):
        train.run(config.replace(strict=True, out=str(tmp_path / "strict")))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_wrong_root_names_the_layout(tmp_path, name):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(data.LayoutError, match="expected layout"):
            data.build(name, root=root)
    with pytest.raises(SystemExit, match="expected layout"):
        train.main(["--dataset", name, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=f"--dataset {name} needs --data ROOT"):
        train.main(["--dataset", name, "--out", str(tmp_path / "run")])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_one_epoch_on_each_dataset(tmp_path, name):
    root = MAKERS[name](tmp_path / "data")
    results = train.run(TOY.replace(dataset=name, data=str(root), out=str(tmp_path / "run")))
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert {"train_ce", "train_cgc", "val_top1"} <= set(log) and log["train_skipped"] == 0
    assert ("content_heatmap" in results) == (name in ("cub", "imagenet"))


@pytest.mark.slow
def test_unlabeled_images_add_their_cgc_term(tmp_path):
    root = make_folder(tmp_path / "labeled", n=3)
    for k in range(6):  # any tree: nested and flat files, no classes
        jpeg(tmp_path / "unlabeled" / ("deep/er" if k % 2 else "") / f"u{k}.png", k % 3)
    out = tmp_path / "run"
    config = TOY.replace(dataset="folder", data=str(root), workers=1, out=str(out))
    train.run(config.replace(unlabeled=str(tmp_path / "unlabeled"), epochs=2))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("train_cgc_unlabeled" in r and "train_cgc" not in r for r in log)
    assert all(r["train_cgc_unlabeled"] > 0 for r in log)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.LayoutError, match="no image files"):
        train.run(config.replace(unlabeled=str(tmp_path / "empty")))


def test_cycling_sampler_resumes_mid_stream():
    full = iter(data.CyclingSampler(5, seed=1))
    stream = [next(full) for _ in range(13)]
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(5)) and stream[:5] != stream[5:10]
    resumed = iter(data.CyclingSampler(5, seed=1, start=7))
    assert [next(resumed) for _ in range(6)] == stream[7:13]


@pytest.mark.slow
def test_head_lr_scales_only_the_head(tmp_path):
    root = make_folder(tmp_path / "tree")
    train.run(
        TOY.replace(
            dataset="folder",
            data=str(root),
            loss="ce",
            lr=0.01,
            head_lr=0.1,
            schedule="constant",
            warmup_epochs=0.0,
            out=str(tmp_path / "run"),
        )
    )
    groups = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert sorted({round(g["lr"], 6) for g in groups}) == [0.01, 0.1]
    assert sum(len(g["params"]) for g in groups if round(g["lr"], 6) == 0.1) == 2  # fc.weight, fc.bias
