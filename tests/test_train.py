"""python -m cgc.train end to end at toy sizes: outputs, exact resume, clear failures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cgc import checkpoint, train

TOY = ["--train-size", "96", "--val-size", "40", "--batch-size", "16", "--image-size", "32",
       "--num-classes", "4", "--overlays", "4"]


def test_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    results = train.main(TOY + ["--epochs", "1", "--out", str(out)])
    for name in ("metrics.json", "log.jsonl", "last.pt", "best.pt", "overlays.png", "curves.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_top1", "val_top5", "content_heatmap", "consistency", "consistency_iou"):
        assert key in metrics and isinstance(metrics[key], float)
    assert 0 <= metrics["content_heatmap"] <= 100 and -1 <= metrics["consistency"] <= 1
    assert results["val_top1"] == metrics["val_top1"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"train_ce", "train_cgc", "val_top1", "lr"} <= set(log[0])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["loss"] == "cgc" and ckpt["target_layer"] == "features"


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_baselines_run(tmp_path, loss):
    results = train.main(TOY + ["--epochs", "1", "--loss", loss, "--out", str(tmp_path)])
    log = json.loads((tmp_path / "log.jsonl").read_text())
    assert ("train_cgc" in log) == (loss != "ce")
    assert results["loss"] == loss


def test_bf16_autocast_run(tmp_path, monkeypatch):
    """--amp bf16: the step runs under bfloat16 autocast (the model's convolutions see it), the
    CGC loss gets float32 heatmaps, and the run ends with finite losses and its outputs."""
    seen = {"conv": set(), "cams": set()}
    real_loss = train.CGCLoss.forward

    def spy_loss(self, cam_orig, cam_aug, theta, **kwargs):
        seen["cams"].add(cam_orig.dtype)
        return real_loss(self, cam_orig, cam_aug, theta, **kwargs)

    real_conv = torch.nn.Conv2d.forward

    def spy_conv(self, x):
        out = real_conv(self, x)
        seen["conv"].add(out.dtype)
        return out

    monkeypatch.setattr(train.CGCLoss, "forward", spy_loss)
    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy_conv)
    train.main(TOY + ["--epochs", "1", "--amp", "bf16", "--out", str(tmp_path)])
    assert torch.bfloat16 in seen["conv"] and seen["cams"] == {torch.float32}
    log = json.loads((tmp_path / "log.jsonl").read_text())
    assert all(torch.isfinite(torch.tensor(log[k])) for k in ("train_ce", "train_cgc", "train_loss"))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["args"]["amp"] == "bf16"


def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    args = TOY + ["--epochs", "2"]
    train.main(args + ["--out", str(tmp_path / "full")])

    real_save = checkpoint.save_atomic

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(checkpoint, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    train.main(args + ["--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut")])

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert full["history"][-1]["train_loss"] == resumed["history"][-1]["train_loss"]


def test_deterministic_runs_repeat_bit_for_bit(tmp_path, monkeypatch):
    """--deterministic: every step runs under torch.use_deterministic_algorithms (nothing on
    the CPU path refuses it), two runs end with bit-identical weights, and the setting is
    restored after the run."""
    modes = []
    real_step = train.train_step

    def spy(*args, **kwargs):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", spy)
    for name in ("a", "b"):
        train.main(TOY + ["--epochs", "1", "--deterministic", "--out", str(tmp_path / name)])
    assert modes and all(modes)
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("a", "b"))
    assert a["args"]["deterministic"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    real_step = train.train_step

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train, "train_step", poisoned)
    with pytest.raises(SystemExit, match="loss became nan"):
        train.main(TOY + ["--epochs", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "last.pt").exists()


def test_resume_errors(tmp_path):
    with pytest.raises(SystemExit, match="checkpoint not found"):
        train.main(TOY + ["--epochs", "1", "--out", str(tmp_path), "--resume", str(tmp_path / "x.pt")])
    train.main(TOY + ["--epochs", "1", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="not a resnet18"):
        train.main(TOY + ["--epochs", "1", "--arch", "resnet18", "--out", str(tmp_path / "b"),
                          "--resume", str(tmp_path / "a")])


def test_cli_rejects_bad_arguments():
    for bad in (["--batch-size", "1"], ["--epochs", "0"], ["--temperature", "0"], ["--loss", "l1"],
                ["--cam", "gradcamm"], ["--cam-weighting", "pooled"]):
        proc = subprocess.run([sys.executable, "-m", "cgc.train", *bad], capture_output=True, text=True)
        assert proc.returncode == 2 and "error" in proc.stderr, bad
    proc = subprocess.run([sys.executable, "-m", "cgc.train", "--cam-weighting", "elementwise"],
                          capture_output=True, text=True)
    assert "--cam hirescam" in proc.stderr


def test_amp_auto_follows_the_hardware(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train, "fast_bfloat16", lambda device: False)
    assert train.resolve_amp("auto", torch.device("cpu")) == "off"
    results = train.main(TOY + ["--epochs", "1", "--loss", "ce", "--out", str(tmp_path / "a")])
    assert results["amp"] == "off" and "float32 (--amp auto: no fast bfloat16" in capsys.readouterr().err
    monkeypatch.setattr(train, "fast_bfloat16", lambda device: True)
    assert train.resolve_amp("auto", torch.device("cpu")) == "bf16" and train.resolve_amp("off", torch.device("cpu")) == "off"


def test_tensorboard_event_files_load_in_tensorboards_reader(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is optional (pip install tensorboard)")
    train.main(TOY + ["--epochs", "2", "--tensorboard", "--out", str(tmp_path)])
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    assert {"step/loss", "step/cgc", "step/lr", "step/lambda", "epoch/val_top1", "epoch/train_loss"} <= set(tags["scalars"])
    assert len(acc.Scalars("step/loss")) == 2 * 6 and [e.step for e in acc.Scalars("epoch/val_top1")] == [1, 2]
    assert tags["images"] == ["overlays"]


def test_results_table_says_what_each_number_means(tmp_path, capsys):
    train.main(TOY + ["--epochs", "1", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "val top-1 (%) ↑" in table and "consistency (cosine) ↑" in table and "pointing game (%) ↑" in table
    assert "higher is better" in table and "energy of the label's heatmap inside the boxes" in table


def test_transfer_and_semi_supervised_flags(tmp_path, capsys):
    """Pretrain on some shapes, fine-tune a new head on others with few images per class, and
    use the rest of the training split (or all of it) as unlabeled images."""
    base = ["--val-size", "30", "--batch-size", "8", "--image-size", "32", "--overlays", "2", "--epochs", "1"]
    train.main(base + ["--train-size", "64", "--classes", "circle,square,ring", "--seed", "5", "--out",
                       str(tmp_path / "pre")])
    out = tmp_path / "ft"
    results = train.main(base + ["--train-size", "120", "--classes", "plus,star,tee", "--weights",
                                 str(tmp_path / "pre" / "best.pt"), "--new-head", "--samples-per-class", "4",
                                 "--unlabeled", "rest", "--unlabeled-batch-size", "8", "--vflip",
                                 "--heatmap-padding", "zeros", "--out", str(out)])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    pre = torch.load(tmp_path / "pre" / "best.pt", weights_only=True)
    assert ckpt["classes"] == ["plus", "star", "tee"] and len((out / "train_files.txt").read_text().splitlines()) == 12
    log = json.loads((out / "log.jsonl").read_text())
    assert "train_cgc_unlabeled" in log and "train_cgc" not in log
    assert not torch.equal(pre["model"]["fc.weight"], ckpt["model"]["fc.weight"])
    assert results["val_top1"] >= 0
    assert "108 unlabeled images" in capsys.readouterr().err  # 120 training images less the 12 labelled
    train.main(base + ["--train-size", "120", "--classes", "plus,star,tee", "--samples-per-class", "4",
                       "--unlabeled", "all", "--unlabeled-batch-size", "8", "--out", str(tmp_path / "all")])
    assert "12 train / 30 val" in (err := capsys.readouterr().err) and "120 unlabeled images" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--unlabeled", "rest"])  # the rest of what?
    with pytest.raises(SystemExit, match="unknown shape 'hexagonn'; did you mean 'hexagon'"):
        train.main(base + ["--classes", "circle,hexagonn", "--out", str(tmp_path / "x")])


def test_compact_stride_four_doubles_the_heatmap_resolution(tmp_path):
    train.main(TOY + ["--epochs", "1", "--compact-stride", "4", "--out", str(tmp_path)])
    from cgc.models import load_model

    loaded = load_model(checkpoint_path=tmp_path)
    with torch.no_grad():
        assert loaded.model.features(loaded.model.stage2(loaded.model.stem(torch.zeros(1, 3, 32, 32)))).shape[-1] == 8


def test_progress_lines_in_logs():
    import io

    from cgc.progress import progress

    stream = io.StringIO()
    bar = progress(range(50), "epoch 1", stream=stream)
    for _ in bar:
        bar.set_postfix(loss="0.5", refresh=False)
    lines = [line for line in stream.getvalue().splitlines() if line]
    assert 5 <= len(lines) <= 13 and all("\r" not in line and len(line) <= 100 for line in lines)
    assert lines[-1].startswith("epoch 1: 100%") and "50/50" in lines[-1]
