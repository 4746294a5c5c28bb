"""python -m cgc.train end to end at toy sizes: outputs, config files, exact resume, the
optimizer's groups, validation cadence, clear failures."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from cgc import CGCLoss, checkpoint, data, engine, files, runtime, train
from cgc.metrics import topk_correct
from cgc.train_config import TrainConfig

#: toy runs with the term on from the first step (no gate): one epoch would otherwise never reach it
TOY = TrainConfig().replace(
    train_size=96, val_size=40, batch_size=16, image_size=32, num_classes=4, overlays=4, epochs=1, term_gate=0.0
)
TOY_FLAGS = ["--train-size", "96", "--val-size", "40", "--batch-size", "16", "--image-size", "32", "--num-classes", "4"]
TOY_FLAGS += ["--term-gate", "0"]


def run(tmp_path, name="run", **changes) -> dict:
    return train.run(TOY.replace(out=str(tmp_path / name), **changes))


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_run_writes_everything(tmp_path):
    results = run(tmp_path)
    out = tmp_path / "run"
    for name in ("metrics.json", "log.jsonl", "steps.jsonl", "last.pt", "best.pt", "overlays.png", "curves.png",
                 "config.yaml", "model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("val_top1", "val_top5", "content_heatmap", "consistency", "consistency_iou"):
        assert key in metrics and isinstance(metrics[key], float)
    assert 0 <= metrics["content_heatmap"] <= 100 and -1 <= metrics["consistency"] <= 1
    assert results["val_top1"] == metrics["val_top1"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"train_ce", "train_cgc", "val_top1", "lr"} <= set(log[0])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["state"]["epoch"] == 1
    assert ckpt["config"] == TOY.replace(out=str(out)).to_dict() and ckpt["target_layer"] == "features"


def test_no_overlays_asked_none_drawn(tmp_path):
    """--overlays 0 is a valid setting: the run ends without overlays.png (it failed at the end)."""
    run(tmp_path, overlays=0, train_size=32, val_size=8)
    assert (tmp_path / "run" / "metrics.json").is_file() and not (tmp_path / "run" / "overlays.png").exists()


@pytest.mark.slow
def test_reported_accuracy_is_the_models_accuracy(tmp_path):
    """The final val top-1 equals the accuracy of the saved weights counted by hand (float32)."""
    results = run(tmp_path, amp="off", epochs=2)
    model = train.models.build_model("compact", 4)
    model.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    val = data.build("synthetic", seed=0, image_size=32, train_size=96, val_size=40, num_classes=4).val
    with torch.no_grad():
        logits = model.eval()(data.normalize(val.images))
    assert results["val_top1"] == pytest.approx(100 * topk_correct(logits, val.labels)[1] / 40, abs=1e-9)


@pytest.mark.slow
def test_config_file_reruns_the_run_bit_for_bit(tmp_path):
    """OUT/config.yaml holds every setting: --config on it gives the same weights; flags given
    with --config override the file."""
    train.main([*TOY_FLAGS, "--epochs", "1", "--seed", "3", "--out", str(tmp_path / "a")])
    train.main(["--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("a", "b"))
    assert weights_equal(a["model"], b["model"])
    again = TrainConfig.load(tmp_path / "b" / "config.yaml")
    assert again == TrainConfig.load(tmp_path / "a" / "config.yaml").replace(out=str(tmp_path / "b"))
    assert again.run.seed == 3 and again.data.train_size == 96
    train.main(["--config", str(tmp_path / "a" / "config.yaml"), "--epochs", "2", "--out", str(tmp_path / "c")])
    assert TrainConfig.load(tmp_path / "c" / "config.yaml").optim.epochs == 2


@pytest.mark.slow
def test_model_safetensors_loads_into_torchvision_strictly(tmp_path):
    """model.safetensors is the plain state dict: torchvision's own model takes it with
    strict=True, and --weights takes it back."""
    from safetensors.torch import load_file
    from torchvision.models import resnet18

    cfg = TOY.replace(arch="resnet18", loss="ce", train_size=32, val_size=16, out=str(tmp_path / "r18"))
    train.run(cfg)
    state = load_file(tmp_path / "r18" / "model.safetensors")
    model = resnet18(num_classes=4)
    model.load_state_dict(state, strict=True)
    ckpt = torch.load(tmp_path / "r18" / "last.pt", weights_only=True)
    assert weights_equal({k: v.contiguous() for k, v in ckpt["model"].items()}, state)
    again = train.models.build_model("resnet18", 4, weights=tmp_path / "r18" / "model.safetensors")
    assert weights_equal(again.state_dict(), state)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_baselines_run(tmp_path, loss):
    results = run(tmp_path, loss=loss)
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert ("train_cgc" in log) == (loss != "ce")
    assert results["loss"] == loss


@pytest.mark.slow
def test_bf16_autocast_run(tmp_path, monkeypatch):
    """--amp bf16: the step runs under bfloat16 autocast (the model's convolutions see it), the
    CGC loss gets float32 heatmaps, and the run ends with finite losses and its outputs."""
    seen = {"conv": set(), "cams": set()}
    real_loss = CGCLoss.forward

    def spy_loss(self, cam_orig, cam_aug, theta, **kwargs):
        seen["cams"].add(cam_orig.dtype)
        return real_loss(self, cam_orig, cam_aug, theta, **kwargs)

    real_conv = torch.nn.Conv2d.forward

    def spy_conv(self, x):
        out = real_conv(self, x)
        seen["conv"].add(out.dtype)
        return out

    monkeypatch.setattr(CGCLoss, "forward", spy_loss)
    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy_conv)
    results = run(tmp_path, amp="bf16")
    assert torch.bfloat16 in seen["conv"] and seen["cams"] == {torch.float32}
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert all(torch.isfinite(torch.tensor(log[k])) for k in ("train_ce", "train_cgc", "train_loss"))
    assert results["amp"] == "bf16"


@pytest.mark.slow
def test_resume_after_interruption_is_exact(tmp_path, monkeypatch):
    run(tmp_path, "full", epochs=2)
    real_save = files.save_atomic

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["state"]["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(files, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", epochs=2)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "cut")["state"]["epoch"] == 1
    run(tmp_path, "cut", epochs=2, resume=str(tmp_path / "cut"))
    full, resumed = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut")
    assert resumed["state"]["epoch"] == 2
    assert weights_equal(full["model"], resumed["model"])
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert full["state"]["history"][-1]["train_loss"] == resumed["state"]["history"][-1]["train_loss"]


@pytest.mark.slow
def test_mid_epoch_resume_is_exact_with_uniform_crops_and_class_negatives(tmp_path, monkeypatch):
    """The term's options keep resume exact: a run cut after a mid-epoch checkpoint and resumed
    ends with the uninterrupted run's weights."""
    options = dict(crop_sampler="uniform", class_negatives=2, checkpoint_every=4, amp="off")
    run(tmp_path, "full", **options)
    real_save = files.save_atomic

    def save_then_die(state, path):
        real_save(state, path)
        if state["state"]["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", **options)
    monkeypatch.undo()
    run(tmp_path, "cut", resume="auto", **options)
    assert weights_equal(checkpoint.load(tmp_path / "full")["model"], checkpoint.load(tmp_path / "cut")["model"])
    log = json.loads((tmp_path / "cut" / "log.jsonl").read_text())
    assert log["train_cgc"] > 0


@pytest.mark.slow
def test_resume_auto_starts_fresh_in_an_empty_folder_and_continues_a_cut_one(tmp_path, monkeypatch):
    """--resume auto (a SLURM job's first start and its requeues): an empty folder starts a new
    run; a folder whose run was cut continues it exactly."""
    run(tmp_path, "whole", epochs=2)
    real_save = files.save_atomic

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["state"]["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "job", epochs=2, resume="auto")  # the first start: nothing to resume
    monkeypatch.undo()
    steps = []
    real_step = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    run(tmp_path, "job", epochs=2, resume="auto")  # the requeued job: only the second epoch runs
    assert len(steps) == 6
    job = checkpoint.load(tmp_path / "job")
    assert [r["epoch"] for r in job["state"]["history"]] == [1, 2]
    assert weights_equal(job["model"], checkpoint.load(tmp_path / "whole")["model"])


@pytest.mark.slow
def test_validation_cadence_and_the_best_checkpoint(tmp_path):
    """--val-every 2 validates at epochs 2 and 4 only; best.pt holds the validated epoch with the
    highest top-1 (ties: the first), last.pt the last."""
    run(tmp_path, epochs=4, val_every=2, train_size=64, lr=0.2)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert ["val_top1" in r for r in log] == [False, True, False, True]
    validated = [(r["val_top1"], -r["epoch"]) for r in log if "val_top1" in r]
    best_epoch = -max(validated)[1]
    best = checkpoint.load(tmp_path / "run" / "best.pt")
    assert best["state"]["epoch"] == best_epoch and best["state"]["best"] == max(validated)[0]
    assert checkpoint.load(tmp_path / "run")["state"]["epoch"] == 4


@pytest.mark.slow
def test_deterministic_runs_repeat_bit_for_bit(tmp_path, monkeypatch):
    """--deterministic: every step runs under torch.use_deterministic_algorithms (nothing on
    the CPU path refuses it), two runs end with bit-identical weights, and the setting is
    restored after the run."""
    modes = []
    real_step = engine.train_step

    def spy(*args, **kwargs):
        modes.append(torch.are_deterministic_algorithms_enabled())
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", spy)
    for name in ("a", "b"):
        train.main([*TOY_FLAGS, "--epochs", "1", "--deterministic", "--out", str(tmp_path / name)])
    assert modes and all(modes)
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = (checkpoint.load(tmp_path / name) for name in ("a", "b"))
    assert checkpoint.config_of(a).run.deterministic
    assert weights_equal(a["model"], b["model"])


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    real_step = engine.train_step

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(engine, "train_step", poisoned)
    with pytest.raises(SystemExit, match="loss became nan"):
        train.main([*TOY_FLAGS, "--epochs", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow
def test_resume_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"--resume .*x\.pt: no checkpoint there"):
        train.main([*TOY_FLAGS, "--out", str(tmp_path), "--resume", str(tmp_path / "x.pt")])
    run(tmp_path, "a")
    with pytest.raises(SystemExit, match="not a resnet18"):
        train.main([*TOY_FLAGS, "--arch", "resnet18", "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a")])


BAD_FLAGS = [
    (["--backend", "nosuch"], "--backend must be one of"),
    (["--backend", "triton"], "--backend triton: backend 'triton' is not available"),
    (["--image-size", "4"], "--image-size must be >= 8"),
    (["--crop-scale", "0", "2"], "--crop-scale must be MIN MAX with 0 < MIN <= MAX <= 1"),
    (["--heatmap-size", "0"], "--heatmap-size must be >= 2"),
    (["--lambda", "-1"], "--lambda must be a finite number >= 0"),
    (["--lambda", "nan"], "--lambda must be a finite number, got nan"),
    (["--batch-size", "1"], "--batch-size must be >= 2 for the CGC term"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
    (["--train-fraction", "0"], "--train-fraction must be in (0, 1]"),
    (["--samples-per-class", "3", "--train-fraction", "0.5"], "not both"),
    (["--loss", "ce", "--unlabeled", "rest"], "--unlabeled needs a CGC term"),
    (["--unlabeled", "rest"], "the rest of what?"),
    (["--unlabeled", "/no/such/dir"], "--unlabeled /no/such/dir is not a folder"),
    (["--new-head"], "--new-head goes with --weights"),
    (["--weights", "/no/such.pt"], "--weights /no/such.pt: no such file"),
    (["--arch", "resnet18", "--norm", "group"], "options of the compact model"),
    (["--dataset", "cub"], "--dataset cub needs --data ROOT"),
    (["--classes", "circle,hexagonn"], "unknown shape 'hexagonn'; did you mean 'hexagon'"),
    (["--num-classes", "13"], "--num-classes must be in [2, 12]"),
    (["--train-size", "8"], "--batch-size 32 is larger than the 8 training images"),
    (["--sync-bn"], "--sync-bn needs CUDA devices"),
    (["--device", "cuda:9"], "cuda"),
    (["--loss", "l1"], "argument --loss: invalid choice"),
    (["--cam", "gradcamm"], "argument --cam: invalid choice"),
    (["--epochs", "two"], "argument --epochs: invalid int value"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_end_in_one_error_line_before_anything_runs(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter would make Triton run
    from cgc import ops

    monkeypatch.setitem(ops._LOADED, "triton", ops.BackendUnavailable("backend 'triton' is not available: no GPU"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        train.main([*flags, "--out", str(out)])
    text = str(exc.value.code) + capsys.readouterr().err
    assert exc.value.code != 0 and message in text and "Traceback" not in text
    assert not out.exists()  # refused before any folder, data or model was made


@pytest.mark.slow
def test_a_bad_flag_exits_without_a_traceback():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "cgc.train", "--lambda", "nan", "--heatmap-size", "0"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --lambda must be a finite number, got nan; --heatmap-size must be >= 2, got 0"
    ]


@pytest.mark.slow
def test_amp_auto_follows_the_hardware(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(runtime, "fast_bfloat16", lambda device: False)
    assert runtime.resolve_amp("auto", torch.device("cpu")) == "off"
    with caplog.at_level(logging.INFO, logger="cgc"):
        results = run(tmp_path, loss="ce")
    assert results["amp"] == "off" and "float32 (--amp auto: no fast bfloat16" in caplog.text
    monkeypatch.setattr(runtime, "fast_bfloat16", lambda device: True)
    assert runtime.resolve_amp("auto", torch.device("cpu")) == "bf16"
    assert runtime.resolve_amp("off", torch.device("cpu")) == "off"


def test_optimizer_groups_decay_weights_only_and_scale_the_head(tmp_path):
    """Weight decay on conv/linear weights only (biases and norm parameters: none); the head's
    groups carry --head-lr / --lr; AdamW takes betas (momentum, 0.999)."""
    model = train.models.build_model("compact", 4)
    cfg = TOY.replace(optimizer="sgd", weight_decay=1e-3, lr=0.1, head_lr=0.5)
    opt = train.build_optimizer(model, cfg.optim, ["fc"])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for group in opt.param_groups:
        for p in group["params"]:
            seen[names[id(p)]] = (group["weight_decay"], group["lr_scale"])
    modules = dict(model.named_modules())
    weights = {
        n
        for n, _ in model.named_parameters()
        if n.endswith(".weight") and isinstance(modules[n.rsplit(".", 1)[0]], (torch.nn.Conv2d, torch.nn.Linear))
    }
    assert seen.keys() == {n for n, _ in model.named_parameters()}
    for name, (decay, scale) in seen.items():
        assert decay == (1e-3 if name in weights else 0.0), name
        assert scale == (5.0 if name.startswith("fc.") else 1.0), name
    adamw = train.build_optimizer(model, cfg.replace(optimizer="adamw", momentum=0.8).optim, ["fc"])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.999)


@pytest.mark.slow
def test_tensorboard_event_files_load_in_tensorboards_reader(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is optional (pip install tensorboard)",
    )
    run(tmp_path, epochs=2, tensorboard=True)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    tags = acc.Reload().Tags()
    assert {"step/loss", "step/cgc", "step/lr", "step/lambda", "epoch/val_top1", "epoch/train_loss"} <= set(
        tags["scalars"]
    )
    assert len(acc.Scalars("step/loss")) == 2 * 6 and [e.step for e in acc.Scalars("epoch/val_top1")] == [1, 2]
    assert tags["images"] == ["overlays"]


@pytest.mark.slow
def test_results_table_says_what_each_number_means(tmp_path, capsys):
    train.main([*TOY_FLAGS, "--epochs", "1", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "val top-1 (%) ↑" in table and "consistency (cosine) ↑" in table and "pointing game (%) ↑" in table
    assert "higher is better" in table and "energy of the label's heatmap inside the boxes" in table


@pytest.mark.slow
def test_new_head_replaces_the_pretrained_head(tmp_path):
    """--new-head: after one negligible step the head is far from the pretrained one; without
    the flag (same class count) it stays next to it."""
    base = TOY.replace(classes=("circle", "square", "ring"), val_size=16, train_size=48, overlays=2)
    train.run(base.replace(out=str(tmp_path / "pre")))
    pre = checkpoint.load(tmp_path / "pre")["model"]["fc.weight"]
    tiny = base.replace(
        classes=("plus", "star", "tee"), weights=str(tmp_path / "pre" / "best.pt"), lr=1e-7, train_size=16, val_size=8
    )
    for flag in (True, False):
        train.run(tiny.replace(new_head=flag, out=str(tmp_path / f"ft{flag}")))
    moved = {
        flag: (checkpoint.load(tmp_path / f"ft{flag}")["model"]["fc.weight"] - pre).abs().max()
        for flag in (True, False)
    }
    assert moved[False] < 1e-5 and moved[True] > 1e-2


@pytest.mark.slow
def test_semi_supervised_streams(tmp_path, caplog):
    """Limited data with the rest (or all) of the training split as unlabeled images, vertical
    flips and zero padding: the term moves to the unlabeled stream."""
    base = TOY.replace(val_size=30, batch_size=8, overlays=2, train_size=120, classes=("plus", "star", "tee"))
    with caplog.at_level(logging.INFO, logger="cgc"):
        train.run(
            base.replace(
                samples_per_class=4,
                unlabeled="rest",
                unlabeled_batch_size=8,
                vflip=True,
                heatmap_padding="zeros",
                out=str(tmp_path / "rest"),
            )
        )
    out = tmp_path / "rest"
    assert checkpoint.load(out)["classes"] == ["plus", "star", "tee"]
    assert len((out / "train_files.txt").read_text().splitlines()) == 12
    log = json.loads((out / "log.jsonl").read_text())
    assert "train_cgc_unlabeled" in log and "train_cgc" not in log
    assert "108 unlabeled images" in caplog.text  # 120 training images less the 12 labeled
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cgc"):
        train.run(base.replace(samples_per_class=4, unlabeled="all", unlabeled_batch_size=8, out=str(tmp_path / "all")))
    assert "12 train / 30 val" in caplog.text and "120 unlabeled images" in caplog.text


@pytest.mark.slow
def test_compact_stride_four_doubles_the_heatmap_resolution(tmp_path):
    run(tmp_path, compact_stride=4)
    from cgc.checkpoint import load_model

    loaded = load_model(checkpoint_path=tmp_path / "run")
    with torch.no_grad():
        assert loaded.model.features(loaded.model.stage2(loaded.model.stem(torch.zeros(1, 3, 32, 32)))).shape[-1] == 8


def test_progress_lines_in_logs(caplog):
    """Not on a terminal, a bar is about ten short log lines, the last one the whole epoch."""
    from cgc.progress import progress

    with caplog.at_level(logging.INFO, logger="cgc"):
        bar = progress(range(50), "epoch 1")
        for _ in bar:
            bar.set_postfix(loss="0.5", refresh=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "cgc.progress"]
    assert 5 <= len(lines) <= 13 and all("\r" not in line and len(line) <= 100 for line in lines)
    assert lines[-1].startswith("epoch 1: 100%") and "50/50" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cgc"):
        list(progress(range(50), "quiet"))
    assert not caplog.records  # an application that did not ask for INFO sees no bars
