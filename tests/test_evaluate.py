"""python -m cgc.evaluate and python -m cgc.explain end to end on toy checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cgc import evaluate, explain, train

TOY = ["--train-size", "96", "--val-size", "40", "--batch-size", "16", "--image-size", "32",
       "--num-classes", "4", "--overlays", "4", "--epochs", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained checkpoints of the same data: CE only and CGC."""
    root = tmp_path_factory.mktemp("runs")
    for loss in ("ce", "cgc"):
        train.main(TOY + ["--loss", loss, "--out", str(root / loss)])
    return root


def test_evaluate_two_checkpoints(runs, tmp_path, capsys):
    out = tmp_path / "eval"
    report = evaluate.main(["--checkpoint", str(runs / "ce"), "--checkpoint", str(runs / "cgc" / "best.pt"),
                            "--out", str(out), "--overlays", "3"])
    assert list(report) == ["ce", "cgc"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["images"] == 40 and saved["settings"]["image_size"] == 32
    for name in ("ce", "cgc"):
        r = saved["models"][name]
        for key in ("top1", "content_heatmap", "pointing_game", "insertion_auc", "deletion_auc", "consistency"):
            assert isinstance(r[key], float), (name, key)
        assert 0 <= r["content_heatmap"] <= 100 and 0 <= r["insertion_auc"] <= 1 and r["loss"] == name
        # the checkpoint's own validation top-1 is reproduced (same data rebuilt from its args)
        ckpt = torch.load((runs / name / ("last.pt" if name == "ce" else "best.pt")), weights_only=True)
        assert r["top1"] == pytest.approx(ckpt["history"][-1]["val_top1"])
    for png in ("overlays.png", "curves.png"):
        with Image.open(out / png) as img:
            assert img.width > 100 and img.height > 100
    table = capsys.readouterr().out
    assert "| metric | ce | cgc |" in table and "deletion AUC" in table
    assert (out / "report.md").read_text().strip() == table.strip()


def test_evaluate_overrides_and_errors(runs, tmp_path):
    report = evaluate.main(["--checkpoint", str(runs / "cgc"), "--name", "mine", "--limit", "8",
                            "--no-causal", "--tolerance", "2", "--cam-input-size", "48", "--out", str(tmp_path)])
    assert report["mine"]["insertion_auc"] is None and report["mine"]["deletion_auc"] is None
    assert not (tmp_path / "curves.png").exists() and (tmp_path / "overlays.png").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["settings"]["images"] == 8
    with pytest.raises(SystemExit, match="classes"):  # a model of other classes cannot be compared
        evaluate.main(["--checkpoint", str(runs / "cgc"), "--num-classes", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        evaluate.main(["--checkpoint", str(tmp_path / "nothing.pt"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(runs / "cgc"), "--name", "a", "--name", "b"])


def test_explain_writes_topk_overlays(runs, tmp_path, capsys):
    from cgc import data

    bundle = data.build("synthetic", train_size=1, val_size=2, image_size=48, num_classes=4)
    png = tmp_path / "shape.png"
    Image.fromarray(bundle.val.images[0].permute(1, 2, 0).numpy()).save(png)
    written = explain.main([str(png), "--checkpoint", str(runs / "cgc"), "--top-k", "2",
                            "--out", str(tmp_path / "out")])
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
    written = explain.main([str(png), "--arch", "resnet18", "--weights", str(tmp_path / "w.pt"),
                            "--image-size", "32", "--out", str(tmp_path)])
    assert written[0].is_file()
    cats = explain.imagenet_categories("resnet18", 1000)
    assert cats is not None and len(cats) == 1000 and explain.imagenet_categories("resnet18", 5) is None


def test_explain_clear_errors(runs, tmp_path):
    with pytest.raises(SystemExit, match="image not found"):
        explain.main([str(tmp_path / "missing.png"), "--checkpoint", str(runs / "cgc")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(SystemExit, match="cannot read image"):
        explain.main([str(bad), "--checkpoint", str(runs / "cgc")])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        explain.main([str(bad), "--checkpoint", str(tmp_path / "none.pt")])
    proc = subprocess.run([sys.executable, "-m", "cgc.explain", str(bad), "--arch", "resnet18"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--weights" in proc.stderr
