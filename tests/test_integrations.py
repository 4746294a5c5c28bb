"""CGC inside the trainers people use, tested with the real libraries (each test skips, saying
why, without them): Hugging Face's ``Trainer`` (:mod:`cgc.integrations.huggingface`) and
Lightning (:mod:`cgc.integrations.lightning`), on one process and on two (gloo).

They check what a user of each trainer relies on: λ 0 is the plain trainer bit for bit, the
term's gradient reaches the CAM layer, the logs hold the term, gradient accumulation divides as
the trainer does, a resumed run continues exactly (the gate where it was), two processes with
global negatives train the model one process trains on the whole batch, and bad input is
refused before training starts.

Equivalence tolerance (1 vs 2 processes): float32 sums over a batch split differently between
processes, so the last bits differ: weights within 1e-5 of the largest weight (measured:
2e-6 Hugging Face's ViT, 3e-7 the compact CNN under Lightning, 3 steps).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgc import TermConfig, distributed
from cgc.errors import ConfigError
from cgc.integrations import CGCStep

from . import trainer_runs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
HF = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="the Trainer integration needs transformers and accelerate (pip install 'cgc[hf]')",
)
LIGHTNING = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None,
    reason="the Lightning integration needs lightning (pip install 'cgc[lightning]')",
)


def run(tmp_path: Path, name: str, framework: str, *flags: str) -> dict:
    """One run in this process: its final weights, logs and gate."""
    out = tmp_path / name
    trainer_runs.main([framework, "--out", str(out), *flags])
    return {
        "weights": torch.load(out / "weights.pt", weights_only=True),
        "logs": json.loads((out / "logs.json").read_text()),
        "gate": json.loads((out / "gate.json").read_text()),
    }


def two_processes(tmp_path: Path, name: str, framework: str, *flags: str) -> dict:
    """The same run on two CPU processes: torchrun for the Trainer, Lightning's own launcher."""
    out = tmp_path / name
    args = ["-m", "tests.trainer_runs", framework, "--out", str(out), *flags]
    if framework == "hf":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    else:
        cmd = [sys.executable, *args, "--devices", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "weights": torch.load(out / "weights.pt", weights_only=True),
        "logs": json.loads((out / "logs.json").read_text()),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict, b: dict, rel: float = 1e-5) -> float:
    scale = max(float(v.abs().max()) for v in a.values())
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= rel * scale, f"weights differ by {diff / scale:.2e} of the largest"
    return diff / scale


# ----------------------------------------------------------------------------- the shared step
@HF
def test_the_terms_gradient_reaches_the_cam_layer():
    """CGCStep on a Hugging Face ViT: the term alone has a gradient at the CAM layer (the last
    block's first norm) and before it."""
    model = trainer_runs.tiny_vit(0)
    step = CGCStep(TermConfig(term_gate=0.0, cam_target="label"))
    images = trainer_runs.Images(8, 0, as_dict=False).x[:8]
    out = step.term(model, images, torch.arange(8) % trainer_runs.CLASSES, step=1)
    out.loss.backward()
    layer = model.get_submodule(step.term_for(model).target_layer)
    assert step.term_for(model).target_layer == "vit.layers.1.layernorm_before"
    assert (
        layer.weight.grad.abs().sum() > 0
        and model.vit.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    )
    step.close()


def test_the_step_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="baseline without a CGC term"):
        CGCStep(TermConfig(loss="ce"))
    with pytest.raises(ConfigError, match="negatives must be one of global, local"):
        CGCStep(TermConfig(), negatives="all")
    with pytest.raises(ConfigError, match="--lambda must be a finite number >= 0"):
        CGCStep(TermConfig(lam=-1.0))


# ----------------------------------------------------------------------------- Hugging Face
@HF
def test_hf_lambda_zero_is_the_plain_trainer_bit_for_bit(tmp_path):
    plain = run(tmp_path, "plain", "hf", "--plain", "--steps", "3")
    off = run(tmp_path, "off", "hf", "--lam", "0", "--steps", "3")
    assert same(plain["weights"], off["weights"]) and off["gate"] is None
    assert not any("cgc_loss" in entry for entry in off["logs"])
    on = run(tmp_path, "on", "hf", "--steps", "3")
    assert not same(plain["weights"], on["weights"])
    steps = [entry for entry in on["logs"] if "loss" in entry]
    assert len(steps) == 3 and all(e["cgc_lambda"] == 1.0 and e["cgc_loss"] > 0 for e in steps)


@HF
def test_hf_gradient_accumulation_divides_as_the_trainer_does(tmp_path):
    """Two micro-batches of 8 give the step of one batch of 16 (the MSE term without the floor:
    no negatives and no batch mean, so the micro-batches' terms add up to the whole batch's; the
    floor's unit is each micro-batch's mean heatmap)."""
    flags = ("--loss", "mse", "--floor", "0", "--steps", "2")
    whole = run(tmp_path, "whole", "hf", *flags, "--batch", "16")
    accumulated = run(tmp_path, "acc", "hf", *flags, "--batch", "8", "--ga", "2")
    close(whole["weights"], accumulated["weights"])


@HF
def test_hf_resume_continues_exactly_with_the_gate_where_it_was(tmp_path):
    """The gate opens in the first two steps and λ ramps in over one epoch (8 steps): a run cut
    at step 2 and resumed from its checkpoint ends where the whole run ends (a ConvNeXt: see
    trainer_runs.tiny_convnext)."""
    flags = ("--arch", "convnext", "--gate", "0.1", "--ramp", "1", "--save-steps", "2")
    whole = run(tmp_path, "whole", "hf", *flags, "--steps", "4")
    run(tmp_path, "cut", "hf", *flags, "--steps", "2")
    saved = json.loads((tmp_path / "cut" / "checkpoint-2" / "cgc_state.json").read_text())
    assert saved["on_at"] is not None
    resumed = run(tmp_path, "cut", "hf", *flags, "--steps", "4", "--resume", str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed["gate"] == whole["gate"]
    assert same(whole["weights"], resumed["weights"])
    lams = [e["cgc_lambda"] for e in whole["logs"] if "loss" in e]
    assert 0 < lams[1] < lams[-1] < 1  # ramping


@HF
@pytest.mark.slow  # two torchrun processes
def test_hf_two_processes_train_the_model_one_process_trains(tmp_path):
    """Global negatives: two processes with 8 images each train what one trains on 16."""
    one = run(tmp_path, "one", "hf", "--batch", "16", "--steps", "3")
    two = two_processes(tmp_path, "two", "hf", "--batch", "8", "--steps", "3")
    close(one["weights"], two["weights"])
    for a, b in zip(one["logs"], two["logs"]):
        if "cgc_loss" in a:
            assert b["cgc_loss"] == pytest.approx(a["cgc_loss"], rel=1e-5)


@HF
def test_hf_bad_input_is_refused_before_training(tmp_path):
    from torch import nn
    from transformers import Trainer

    from cgc.errors import UnsupportedModel
    from cgc.integrations.huggingface import CGCTrainer, CGCTrainingArguments

    args = CGCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    dataset = trainer_runs.Images(16, 0, as_dict=True)
    with pytest.raises(ConfigError, match="cgc_lambda must be a finite number >= 0"):
        CGCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, cgc_lambda=-1.0)
    with pytest.raises(UnsupportedModel, match="could not find the CAM layer of Sequential"):
        CGCTrainer(model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)), args=args, train_dataset=dataset)
    unlabeled = [{"pixel_values": x} for x in dataset.x]
    with pytest.raises(ConfigError, match="dataset's examples hold \\['pixel_values'\\]"):
        CGCTrainer(model=trainer_runs.tiny_vit(0), args=args, train_dataset=unlabeled)
    with pytest.raises(ConfigError, match="takes CGCTrainingArguments"):
        CGCTrainer(model=trainer_runs.tiny_vit(0), args=Trainer(model=nn.Linear(1, 1)).args, train_dataset=dataset)
    sharded = CGCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], fsdp=True)
    with pytest.raises(ConfigError, match="does not run under FSDP"):
        CGCTrainer(model=trainer_runs.tiny_vit(0), args=sharded, train_dataset=dataset)


# ----------------------------------------------------------------------------- Lightning
@LIGHTNING
def test_lightning_lambda_zero_is_plain_cross_entropy_bit_for_bit(tmp_path):
    """CGCClassifier with λ 0 trains as a plain LightningModule with cross-entropy and AdamW."""
    import lightning as L
    import torch.nn.functional as F

    from cgc.models import CompactCNN

    class Plain(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return F.cross_entropy(self.model(images), labels)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)

    off = run(tmp_path, "off", "lightning", "--lam", "0", "--steps", "3")
    L.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    net = CompactCNN(trainer_runs.CLASSES, norm="group")
    images = trainer_runs.Images(64, 0, as_dict=False)
    loader = torch.utils.data.DataLoader(images, batch_sampler=distributed.GlobalBatchSampler(64, 8, seed=0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Plain(net), loader)
    assert same(off["weights"], net.state_dict())
    on = run(tmp_path, "on", "lightning", "--steps", "3")
    assert on["logs"]["cgc_lambda"] == 1.0 and on["logs"]["cgc_loss"] > 0 and on["gate"]["first_step"] == 1


@LIGHTNING
def test_lightning_resume_continues_exactly_with_the_gate_where_it_was(tmp_path):
    """A run resumed from the checkpoint Lightning saved after step 8 ends where the whole run
    ends: the gate, closed at step 8, comes back with its moving top-1 and opens at the same
    step, and λ ramps in from there."""
    flags = ("--gate", "0.2", "--ramp", "2")
    whole = run(tmp_path, "whole", "lightning", *flags, "--steps", "16", "--save-steps", "8")
    saved = tmp_path / "whole" / "step=8.ckpt"
    resumed = run(tmp_path, "again", "lightning", *flags, "--steps", "16", "--resume", str(saved))
    assert torch.load(saved, weights_only=True)["cgc_gate"]["on_at"] is None
    assert resumed["gate"] == whole["gate"] and whole["gate"]["first_step"] > 8
    assert same(whole["weights"], resumed["weights"])


@LIGHTNING
@pytest.mark.slow  # Lightning's DDP launches a second process
def test_lightning_two_processes_train_the_model_one_process_trains(tmp_path):
    one = run(tmp_path, "one", "lightning", "--batch", "16", "--steps", "3")
    two = two_processes(tmp_path, "two", "lightning", "--batch", "8", "--steps", "3")
    close(one["weights"], two["weights"])
    assert two["logs"]["cgc_loss"] == pytest.approx(one["logs"]["cgc_loss"], rel=1e-5)
    assert two["logs"]["train_ce"] == pytest.approx(one["logs"]["train_ce"], rel=1e-5)  # the global batch's


@LIGHTNING
def test_lightning_bf16(tmp_path):
    out = run(tmp_path, "bf16", "lightning", "--steps", "2", "--bf16")
    assert all(torch.isfinite(v).all() for v in out["weights"].values()) and out["logs"]["cgc_loss"] > 0


# ----------------------------------------------------------------------------- the examples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(*args: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@HF
@pytest.mark.slow  # a fresh Python process with transformers and a short fine-tune
def test_the_trainer_example_runs_as_written(tmp_path):
    import transformers

    config = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=6)  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    out = run_example(str(EXAMPLES / "hf_trainer.py"), "--model", str(tmp_path / "vit"), "--out", str(tmp_path / "run"),
                      "--per-class", "2", "--epochs", "2", "--val-size", "24")  # fmt: skip
    assert "'consistency_iou'" in out and "term:" in out


@LIGHTNING
@pytest.mark.slow  # a fresh Python process with Lightning and an epoch of the compact model
def test_the_lightning_example_runs_as_written():
    out = run_example(str(EXAMPLES / "lightning_classifier.py"), "--epochs", "1")
    assert "'consistency_iou'" in out and "term:" in out
