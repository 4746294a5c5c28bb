"""Checkpoints: atomic, safe to load (weights_only), RNG states round-trip, every earlier format
loads, the saver ranks by the metric it is given."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from cgc import checkpoint, files, runtime
from cgc.gate import GateState
from cgc.run_state import RunState


def test_atomic_save_and_safe_load(tmp_path):
    state = {"format": checkpoint.FORMAT, "model": {"w": torch.randn(3)}, "rng": [runtime.rng_state()]}
    files.save_atomic(state, tmp_path / "run" / "last.pt")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"]  # no temp files left
    loaded = checkpoint.load(tmp_path / "run")  # a run folder means its last.pt
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    files.save_atomic({"format": checkpoint.FORMAT, "model": {"w": torch.ones(2)}}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        files.save_atomic({"model": {"w": torch.ones(2)}, "bad": lambda: 0}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_corrupt_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nope.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cgc checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_rng_state_round_trip():
    state = runtime.rng_state()
    a = (torch.rand(3), random.random())
    runtime.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def format_one_checkpoint(tmp_path, **args):
    """A checkpoint as the first format wrote it: the command line's namespace as ``args``
    (``cam_weighting`` before CAM methods had names, ``classes`` comma-separated), one RNG
    state, the mid-epoch position as ``epoch_state``."""
    from cgc.models import build_model
    from cgc.optimization import OptimConfig, build_optimizer

    model = build_model("compact", 3)
    opt = build_optimizer(model, OptimConfig(optimizer="sgd"), ["fc"])  # the only optimizer then
    flags = {"arch": "compact", "dataset": "synthetic", "image_size": 32, "train_size": 48, "val_size": 12,
             "classes": "circle,square,ring", "lam": 0.5, "crop_scale": [0.2, 1.0], "cam_weighting": "elementwise",
             "epochs": 3, "out": str(tmp_path / "old")}  # fmt: skip
    flags.update(args)
    payload = {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1, "global_step": 5, "args": flags,
        "classes": ["circle", "square", "ring"], "image_size": 32, "target_layer": "features",
        "rng": runtime.rng_state(), "best_top1": 50.0, "history": [{"epoch": 1, "val_top1": 50.0}],
        "epoch_state": {"step": 2, "sums": {"loss": 3.0}, "steps": 2, "skipped": 0},
    }  # fmt: skip
    files.save_atomic(payload, tmp_path / "old" / "last.pt")
    return model


def test_checkpoints_of_the_first_format_still_load(tmp_path):
    """load() brings a first-format checkpoint to today's: its config, CAM method, position and
    RNG states, and the evaluation's model loader rebuilds the model from it."""
    from cgc.checkpoint import load_model

    model = format_one_checkpoint(tmp_path)
    ckpt = checkpoint.load(tmp_path / "old")
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["cam"] == "hirescam"
    config = checkpoint.config_of(ckpt)
    assert config.data.classes == ("circle", "square", "ring") and config.term.lam == 0.5
    assert config.term.crop_scale == (0.2, 1.0) and config.term.cam == "hirescam"
    assert config.optim.epochs == 3 and config.optim.batch_size == 32  # absent then: the default
    # settings that did not exist then (or had another default): what the run trained with
    term = config.term
    assert (config.optim.optimizer, term.term_gate, term.cam_target, term.detach_target, term.heatmap_floor) == (
        "sgd",
        0.0,
        "predicted",
        False,
        0.0,
    )
    state = RunState.from_dict(ckpt["state"])
    assert state.gate == GateState(on_at=0.0)  # no gate then: the term was on from the start
    assert (state.epoch, state.step, state.global_step, state.best, state.best_metric) == (1, 2, 5, 50.0, "val_top1")
    assert state.sums == {"loss": 3.0} and isinstance(ckpt["rng"], list) and len(ckpt["rng"]) == 1
    loaded = load_model(checkpoint_path=tmp_path / "old")
    assert loaded.method == "hirescam" and loaded.image_size == 32 and loaded.target_layer == "features"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    cut = tmp_path / "newer"
    files.save_atomic({"format": checkpoint.FORMAT + 1, "model": {}}, cut / "last.pt")
    with pytest.raises(ValueError, match="written by a newer cgc"):
        checkpoint.load(cut)


@pytest.mark.slow
def test_a_first_format_run_resumes(tmp_path):
    """python -m cgc.train --resume continues a first-format checkpoint where it stopped."""
    from cgc import train

    format_one_checkpoint(tmp_path)
    cfg = checkpoint.config_of(checkpoint.load(tmp_path / "old"))
    results = train.run(cfg.replace(batch_size=16, resume=str(tmp_path / "old"), overlays=2, cam="hirescam"))
    history = checkpoint.load(tmp_path / "old")["state"]["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3] and results["epochs"] == 3


def test_second_format_checkpoints_load_with_their_best_top1(tmp_path):
    """Format 2 kept the position as ``progress`` with ``best_top1`` (-1 before any validation):
    it becomes ``state`` with the best value of val_top1, or None."""
    for best, want in ((71.5, 71.5), (-1.0, None)):
        progress = {"epoch": 2, "step": 0, "sums": {}, "steps": 0, "skipped": 0, "global_step": 8,
                    "best_top1": best, "history": []}  # fmt: skip
        files.save_atomic({"format": 2, "model": {}, "config": {}, "progress": progress}, tmp_path / "last.pt")
        ckpt = checkpoint.load(tmp_path / "last.pt")
        assert ckpt["format"] == checkpoint.FORMAT and "progress" not in ckpt
        state = RunState.from_dict(ckpt["state"])
        assert state == RunState(epoch=2, global_step=8, best=want, best_metric="val_top1", gate=GateState(0.0))
        assert ckpt["config"]["term"]["term_gate"] == 0.0 and ckpt["config"]["term"]["cam_target"] == "predicted"


def test_third_format_checkpoints_load_with_their_config_by_sections_and_their_gate(tmp_path):
    """Format 3 kept the config as one flat mapping and the term's gate in three fields of the
    state; format 4 keeps the config by sections and the gate as ``state["gate"]``."""
    flat = {"arch": "compact", "epochs": 7, "temperature": 0.2, "term_gate": 0.5, "data": "/somewhere", "seed": 3}
    state = {"epoch": 1, "step": 0, "sums": {}, "counts": {}, "steps": 0, "skipped": 0, "global_step": 40,
             "best": None, "best_metric": "val_top1", "history": [], "term_on_at": 0.6, "train_top1_average": 0.7,
             "term_first_step": 25}  # fmt: skip
    files.save_atomic({"format": 3, "model": {}, "config": flat, "state": state}, tmp_path / "last.pt")
    ckpt = checkpoint.load(tmp_path / "last.pt")
    config = checkpoint.config_of(ckpt)
    assert (config.optim.epochs, config.term.temperature, config.term.term_gate) == (7, 0.2, 0.5)
    assert config.data.root == "/somewhere" and config.run.seed == 3  # 'data' was the root's name
    assert config.term.heatmap_floor == 0.0  # absent then: the run had no floor
    assert RunState.from_dict(ckpt["state"]).gate == GateState(0.6, 25, 0.7)
    assert checkpoint.term_outcome(ckpt).summary() == "from step 25 of 40"


class _OneProcess:
    rank, world_size, primary = 0, 1, True

    @staticmethod
    def all_gather_object(obj):
        return [obj]


@pytest.mark.parametrize(("metric", "mode", "best_epoch"), [("val_top1", "max", 2), ("train_loss", "min", 4)])
def test_the_saver_keeps_the_best_epoch_by_its_metric(tmp_path, metric, mode, best_epoch):
    """best.pt is the epoch whose record is best by the saver's metric and direction; epochs
    without that metric (not validated) never count."""
    from cgc.train_config import TrainConfig

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = checkpoint.CheckpointSaver(tmp_path, TrainConfig(), model, opt, _OneProcess(), info={},
                                       metric=metric, mode=mode)  # fmt: skip
    assert saver.resume(None) is None  # a new run
    state = RunState(best_metric=metric)
    records = [{"val_top1": 50.0, "train_loss": 2.0}, {"val_top1": 80.0, "train_loss": 1.5},
               {"val_top1": 70.0, "train_loss": 1.0}, {"train_loss": 0.5}]  # fmt: skip
    for record in records:
        saver.end_epoch(state, record)
    best = checkpoint.load(tmp_path / "best.pt")["state"]
    assert best["epoch"] == best_epoch and best["best_metric"] == metric
    assert best["best"] == records[best_epoch - 1][metric]
    with pytest.raises(ValueError, match="'max' or 'min'"):
        checkpoint.CheckpointSaver(tmp_path, TrainConfig(), model, opt, _OneProcess(), info={}, mode="up")
