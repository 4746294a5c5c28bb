"""python -m cgc.evaluate and python -m cgc.explain end to end on toy checkpoints."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cgc import evaluate, explain, train
from cgc.train_config import TrainConfig

#: float32 (amp off): the evaluation, in float32, must reproduce the training's validation exactly
TOY = TrainConfig().replace(
    train_size=96,
    val_size=40,
    batch_size=16,
    image_size=32,
    num_classes=4,
    overlays=4,
    epochs=1,
    amp="off",
    term_gate=0.0,  # the term from the first step: a one-epoch toy run would otherwise never reach it
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained checkpoints of the same data: CE only and CGC."""
    root = tmp_path_factory.mktemp("runs")
    for loss in ("ce", "cgc"):
        train.run(TOY.replace(loss=loss, out=str(root / loss)))
    return root


@pytest.mark.slow
def test_evaluate_two_checkpoints(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    report = evaluate.main(
        [
            "--checkpoint",
            str(runs / "ce"),
            "--checkpoint",
            str(runs / "cgc" / "best.pt"),
            "--out",
            str(out),
            "--overlays",
            "3",
        ]
    )
    assert list(report) == ["ce", "cgc"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["images"] == 40 and saved["settings"]["image_size"] == 32
    for name in ("ce", "cgc"):
        r = saved["models"][name]
        for key in (
            "top1",
            "content_heatmap",
            "pointing_game",
            "insertion_auc",
            "deletion_auc",
            "consistency",
            "mprt",
            "random_logit",
            "max_sensitivity",
            "sparseness",
            "complexity",
        ):
            assert isinstance(r[key], float), (name, key)
        assert len(r["mprt_steps"]) == len(r["mprt_step_names"]) == 4
        assert 0 <= r["content_heatmap"] <= 100 and 0 <= r["insertion_auc"] <= 1 and r["loss"] == name
        # the checkpoint's own validation top-1 is reproduced (same data rebuilt from its args)
        ckpt = torch.load((runs / name / ("last.pt" if name == "ce" else "best.pt")), weights_only=True)
        assert r["top1"] == pytest.approx(ckpt["state"]["history"][-1]["val_top1"])
    for png in ("overlays.png", "curves.png", "randomization.png"):
        with Image.open(out / png) as img:
            assert img.width > 100 and img.height > 100
    table = capsys.readouterr().out
    assert re.search(r"\| metric +\| +ce \| +cgc \|", table) and "deletion AUC" in table
    assert (out / "report.md").read_text().strip() == table.strip()


@pytest.mark.slow
def test_evaluate_overrides_and_errors(runs, tmp_path):
    report = evaluate.main(
        [
            "--checkpoint",
            str(runs / "cgc"),
            "--name",
            "mine",
            "--limit",
            "8",
            "--no-causal",
            "--tolerance",
            "2",
            "--cam-input-size",
            "48",
            "--out",
            str(tmp_path),
        ]
    )
    assert report["mine"]["insertion_auc"] is None and report["mine"]["deletion_auc"] is None
    assert not (tmp_path / "curves.png").exists() and (tmp_path / "overlays.png").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["images"] == 8
    with pytest.raises(SystemExit, match="classes"):  # a model of other classes cannot be compared
        evaluate.main(["--checkpoint", str(runs / "cgc"), "--num-classes", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        evaluate.main(["--checkpoint", str(tmp_path / "nothing.pt"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(runs / "cgc"), "--name", "a", "--name", "b"])


@pytest.mark.slow
def test_evaluate_a_run_on_a_subset_of_the_shapes(tmp_path):
    """A run trained with --classes is evaluated on those shapes, not on the default ten."""
    train.run(
        TOY.replace(
            train_size=24,
            val_size=12,
            batch_size=8,
            overlays=2,
            classes=("plus", "star", "tee"),
            out=str(tmp_path / "run"),
        )
    )
    report = evaluate.main(["--checkpoint", str(tmp_path / "run"), "--skip-slow", "--out", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["settings"]["images"] == 12
    assert isinstance(report["run"]["top1"], float)


@pytest.mark.slow
def test_explain_writes_topk_overlays(runs, tmp_path, capsys):
    from cgc import data

    bundle = data.build("synthetic", train_size=1, val_size=2, image_size=48, num_classes=4)
    png = tmp_path / "shape.png"
    Image.fromarray(bundle.val.images[0].permute(1, 2, 0).numpy()).save(png)
    written = explain.main(
        [str(png), "--checkpoint", str(runs / "cgc"), "--top-k", "2", "--out", str(tmp_path / "out")]
    )
    assert [p.name for p in written] == ["shape_gradcam.png"]
    with Image.open(written[0]) as img:
        assert img.width > img.height  # image + two overlays side by side
    line = capsys.readouterr().out
    assert line.startswith(str(png)) and line.count("%") == 2
    assert any(c in line for c in ("circle", "square", "triangle", "plus"))


def test_explain_with_arch_and_weights(tmp_path):
    import torchvision

    model = torchvision.models.get_model("resnet18", num_classes=5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    png = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(png)
    written = explain.main(
        [
            str(png),
            "--arch",
            "resnet18",
            "--weights",
            str(tmp_path / "w.pt"),
            "--image-size",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    assert written[0].is_file()
    from cgc.models import imagenet_categories

    cats = imagenet_categories("resnet18", 1000)
    assert cats is not None and len(cats) == 1000 and imagenet_categories("resnet18", 5) is None


@pytest.mark.slow
def test_explain_clear_errors(runs, tmp_path):
    with pytest.raises(SystemExit, match="image not found"):
        explain.main([str(tmp_path / "missing.png"), "--checkpoint", str(runs / "cgc")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(SystemExit, match="cannot read image"):
        explain.main([str(bad), "--checkpoint", str(runs / "cgc")])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        explain.main([str(bad), "--checkpoint", str(tmp_path / "none.pt")])
    proc = subprocess.run(
        [sys.executable, "-m", "cgc.explain", str(bad), "--arch", "resnet18"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "--weights" in proc.stderr  # as every command's settings errors


def voc_xml(path, name, box, size=(60, 50)):
    x0, y0, x1, y1 = box
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
    )


def photo_folder(root, classes=("0", "3"), per_class=3):
    """Class folders named by the model's class indices, one VOC file per photo."""
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            img = Image.new("RGB", (60, 50), (40 * k, 90, 200 - 50 * i))
            img.paste((255, 255, 255), (10 + 5 * k, 8, 40 + 5 * k, 40))
            img.save(root / c / f"p{c}_{k}.jpg")
            voc_xml(root / "annotation" / f"p{c}_{k}.xml", c, (10 + 5 * k, 8, 40 + 5 * k, 40))
    return root


@pytest.mark.slow
def test_evaluate_any_model_on_a_folder_of_photos_with_voc_boxes(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "w.pth")
    root = photo_folder(tmp_path / "photos")
    report = evaluate.main(
        [
            "--arch",
            "resnet18",
            "--weights",
            str(tmp_path / "w.pth"),
            "--dataset",
            "folder",
            "--data",
            str(root),
            "--image-size",
            "64",
            "--skip-slow",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    r = report["w"]
    assert r["top1"] is not None and r["content_heatmap"] is not None and r["mprt"] is None  # slow: skipped
    settings = json.loads((tmp_path / "e" / "report.json").read_text())["settings"]
    assert settings["images"] == 6 and settings["classes"] == ["0", "3"]  # the whole folder, boxes from the XML
    # a flat folder: each photo's class from its XML
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(root.rglob("*.jpg")):
        p.rename(flat / p.name)
    (root / "annotation").rename(flat / "annotation")
    report = evaluate.main(
        [
            "--arch",
            "resnet18",
            "--weights",
            str(tmp_path / "w.pth"),
            "--dataset",
            "folder",
            "--data",
            str(flat),
            "--image-size",
            "64",
            "--metrics",
            "top1",
            "pointing_game",
            "--out",
            str(tmp_path / "f"),
        ]
    )
    assert report["w"]["pointing_game"] is not None and report["w"]["sparseness"] is None


@pytest.mark.slow
def test_evaluate_bad_inputs_are_one_clear_line(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "w.pth")
    base = [
        "--arch",
        "resnet18",
        "--weights",
        str(tmp_path / "w.pth"),
        "--dataset",
        "folder",
        "--image-size",
        "64",
        "--metrics",
        "top1",
        "--out",
        str(tmp_path / "e"),
    ]

    def error(root, pattern):
        """The first line says what is wrong (a layout error goes on with the expected layout)."""
        with pytest.raises(SystemExit) as info:
            evaluate.main(base + ["--data", str(root)])
        first = str(info.value.code).splitlines()[0]
        assert first.startswith("error: ") and re.search(pattern, first), first

    (tmp_path / "empty").mkdir()
    error(tmp_path / "empty", "no class folders")
    missing = photo_folder(tmp_path / "missing")
    (missing / "annotation" / "p0_1.xml").unlink()
    error(missing, "p0_1.xml is missing")
    outside = photo_folder(tmp_path / "outside")
    voc_xml(outside / "annotation" / "p3_0.xml", "3", (70, 8, 90, 40))
    error(outside, "lies outside the 60 x 50 image")
    named = photo_folder(tmp_path / "named", classes=("cat", "dog"))
    error(named, "cannot tell which of the model's 5 classes")
    torch.save(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 2)).state_dict(), tmp_path / "mlp.pth"
    )
    with pytest.raises(SystemExit, match="unknown architecture"):
        evaluate.main(
            [
                "--arch",
                "mlp",
                "--weights",
                str(tmp_path / "mlp.pth"),
                "--dataset",
                "synthetic",
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_a_model_without_a_spatial_layer_is_a_clear_error(tmp_path):
    from cgc import GradCAM
    from cgc.errors import UnsupportedModel

    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 224 * 224, 2))
    with pytest.raises(UnsupportedModel, match="could not find a convolutional layer with a spatial output"):
        GradCAM(flat)
    with pytest.raises(UnsupportedModel, match="a forward pass of 224x224 px images failed"):
        GradCAM(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)))


@pytest.mark.slow
def test_evaluate_and_explain_reuse_the_checkpoints_cam_method_and_layer(tmp_path, monkeypatch):
    """A run trained with ``--cam gradcam++ --target-layer stage2`` (the compact model's second
    stage, an 8x8 map at 32 px): evaluate and explain build every GradCAM with that method at
    that layer, not the defaults (gradcam at ``features``), and ``--cam`` / ``--target-layer``
    override them."""
    from cgc.cam import GradCAM

    run = tmp_path / "run"
    train.run(
        TrainConfig().replace(
            train_size=32,
            val_size=16,
            batch_size=8,
            image_size=32,
            num_classes=3,
            epochs=1,
            overlays=2,
            cam="gradcam++",
            target_layer="stage2",
            out=str(run),
        )
    )
    built = []
    init = GradCAM.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append((self.method, self.target_layer))

    monkeypatch.setattr(GradCAM, "__init__", spy)
    png = tmp_path / "x.png"
    Image.new("RGB", (40, 36), (200, 30, 30)).save(png)
    quick = ["--metrics", "top1", "content_heatmap", "--limit", "4", "--overlays", "1"]

    report = evaluate.main(["--checkpoint", str(run), "--out", str(tmp_path / "eval"), *quick])
    assert built and set(built) == {("gradcam++", "stage2")}, built
    assert (report["run"]["cam"], report["run"]["target_layer"]) == ("gradcam++", "stage2")
    built.clear()
    explain.main([str(png), "--checkpoint", str(run), "--top-k", "1", "--out", str(tmp_path / "explain")])
    assert built and set(built) == {("gradcam++", "stage2")}, built

    built.clear()
    flags = ["--cam", "layercam", "--target-layer", "features"]
    report = evaluate.main(["--checkpoint", str(run), "--out", str(tmp_path / "eval2"), *quick, *flags])
    assert built and set(built) == {("layercam", "features")}, built
    assert (report["run"]["cam"], report["run"]["target_layer"]) == ("layercam", "features")
    built.clear()
    explain.main([str(png), "--checkpoint", str(run), "--top-k", "1", "--out", str(tmp_path / "explain2"), *flags])
    assert built and set(built) == {("layercam", "features")}, built
