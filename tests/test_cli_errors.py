"""Every command line answers a bad input with one ``error: ...`` line and a non-zero exit, not a
traceback: a corrupt checkpoint, weights that ``torch.load(weights_only=True)`` refuses, an
unknown architecture or CAM layer (with the closest names suggested)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from cgc import evaluate, explain, train
from cgc.train_config import TrainConfig

TOY = [
    "--train-size",
    "32",
    "--val-size",
    "16",
    "--batch-size",
    "8",
    "--image-size",
    "32",
    "--num-classes",
    "3",
    "--overlays",
    "2",
    "--epochs",
    "1",
]


class RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train.run(TrainConfig().replace(train_size=32, val_size=16, batch_size=8, image_size=32, num_classes=3, overlays=2,
                          epochs=1, loss="ce", out=str(root / "run")))  # fmt: skip
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 cut short")
    torch.save({"conv1.weight": RunsCode()}, root / "code.pth")
    Image.new("RGB", (40, 40), (120, 20, 200)).save(root / "img.png")
    return root


def one_line_error(call, argv) -> str:
    with pytest.raises(SystemExit) as info:
        call(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_corrupt_checkpoint(files):
    corrupt = str(files / "corrupt.pt")
    for call, argv in (
        (train.main, TOY + ["--resume", corrupt, "--out", str(files / "r")]),
        (evaluate.main, ["--checkpoint", corrupt, "--out", str(files / "e")]),
        (explain.main, [str(files / "img.png"), "--checkpoint", corrupt, "--out", str(files / "x")]),
    ):
        assert "corrupt" in one_line_error(call, argv)


def test_weights_with_code_are_refused(files):
    code = str(files / "code.pth")
    for call, argv in (
        (train.main, TOY + ["--arch", "resnet18", "--weights", code, "--out", str(files / "r")]),
        (explain.main, [str(files / "img.png"), "--arch", "resnet18", "--weights", code]),
    ):
        message = one_line_error(call, argv)
        assert "Python objects" in message and "state_dict" in message


def test_unknown_architecture(files):
    for call, argv in (
        (train.main, TOY + ["--arch", "resnet19", "--out", str(files / "r")]),
        (explain.main, [str(files / "img.png"), "--arch", "resnet19", "--pretrained"]),
    ):
        assert "did you mean 'resnet18'" in one_line_error(call, argv)


def test_unknown_target_layer(files):
    for call, argv in (
        (train.main, TOY + ["--target-layer", "featurez", "--out", str(files / "r")]),
        (
            evaluate.main,
            [
                "--checkpoint",
                str(files / "run"),
                "--target-layer",
                "featurez",
                "--no-causal",
                "--out",
                str(files / "e"),
            ],
        ),
        (
            explain.main,
            [
                str(files / "img.png"),
                "--checkpoint",
                str(files / "run"),
                "--target-layer",
                "featurez",
                "--out",
                str(files / "x"),
            ],
        ),
    ):
        assert "did you mean 'features'" in one_line_error(call, argv)


@pytest.mark.slow
def test_the_real_command_prints_no_traceback(files):
    proc = subprocess.run(
        [sys.executable, "-m", "cgc.train", *TOY, "--resume", str(files / "corrupt.pt"), "--out", str(files / "r")],
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and "corrupt" in lines[-1]


@pytest.mark.slow
def test_transformers_that_cannot_be_explained_as_asked(files, tmp_path):
    """A model without a usable spatial layer, a layer whose patch tokens do not reach the
    head, and an image size the model cannot take: one error line from each command line."""
    pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    from cgc.models import build_model

    weights = tmp_path / "mixer.pth"
    torch.save(build_model("timm:mixer_s32_224", 3).state_dict(), weights)
    for call, argv, expected in (
        (train.main, [*TOY, "--arch", "timm:mixer_s32_224", "--out", str(tmp_path / "a")], "is no last stage"),
        (
            explain.main,
            [str(files / "img.png"), "--arch", "timm:mixer_s32_224", "--weights", str(weights)],
            "is no last stage",
        ),
        (
            evaluate.main,
            [
                "--arch",
                "timm:mixer_s32_224",
                "--weights",
                str(weights),
                "--dataset",
                "synthetic",
                "--num-classes",
                "3",
                "--train-size",
                "8",
                "--val-size",
                "8",
                "--image-size",
                "32",
            ],
            "is no last stage",
        ),
        (
            train.main,
            [*TOY, "--arch", "timm:test_vit", "--target-layer", "norm", "--out", str(tmp_path / "b")],
            "do not depend on the patch tokens",
        ),
        (
            train.main,
            [*TOY, "--arch", "timm:swin_tiny_patch4_window7_224", "--image-size", "48", "--out", str(tmp_path / "c")],
            "cannot take 48 px images",
        ),
    ):
        assert expected in one_line_error(call, argv), argv
