"""What the CGC term costs inside the trainers cgc integrates with, against that trainer's own
cross-entropy step on the same batches: Hugging Face's ``Trainer`` (``CGCTrainer``, a ViT from
``transformers``) and Lightning (``CGCClassifier``, cgc's compact CNN), batch 32 at 64 px, each
trainer's whole optimizer step (forward, backward, update) timed by a callback. λ 0 is each
integration's plain trainer step (the term never computed); the CGC step has the term on from
the first step. Table: ``CGC_BENCH_INTEGRATIONS_TABLE=path``.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import pytest
import torch

from .conftest import publish

BATCH, SIZE, STEPS, WARMUP = 32, 64, 12, 3
#: (device, trainer) -> {variant: median step ms}
TIMES: dict[tuple[str, str], dict[str, float]] = {}


def _dataset(as_dict: bool):
    from cgc import data

    bundle = data.build("synthetic", seed=0, image_size=SIZE, train_size=BATCH * (STEPS + 1), val_size=8, num_classes=6)
    x, y = data.normalize(bundle.train.images), bundle.train.labels
    if as_dict:
        return [{"pixel_values": x[i], "labels": int(y[i])} for i in range(len(y))]
    return torch.utils.data.TensorDataset(x, y)


def hf_step_ms(device: str, lam: float) -> float:
    import transformers
    from transformers import TrainerCallback

    from cgc.integrations.huggingface import CGCTrainer, CGCTrainingArguments

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=SIZE, patch_size=8, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, num_labels=6)  # fmt: skip
    args = CGCTrainingArguments(
        output_dir="/tmp/cgc-bench-hf", per_device_train_batch_size=BATCH, max_steps=STEPS, use_cpu=device == "cpu",
        report_to=[], save_strategy="no", disable_tqdm=True, cgc_lambda=lam, cgc_term_gate=0.0,
        cgc_lambda_warmup_epochs=0.0, cgc_cam_target="label",
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    CGCTrainer(model=model, args=args, train_dataset=_dataset(True), callbacks=[Clock()]).train()
    return 1e3 * statistics.median(b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :]))


def lightning_step_ms(device: str, lam: float) -> float:
    import lightning as L

    from cgc.integrations.lightning import CGCClassifier
    from cgc.models import CompactCNN

    stamps: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())

    torch.manual_seed(0)
    module = CGCClassifier(CompactCNN(6, norm="group"), lam=lam, term_gate=0.0, lambda_warmup_epochs=0.0)
    loader = torch.utils.data.DataLoader(_dataset(False), batch_size=BATCH, drop_last=True)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])  # fmt: skip
    trainer.fit(module, loader)
    return 1e3 * statistics.median(b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :]))


TRAINERS = {
    "Hugging Face Trainer, ViT (4 blocks, width 64)": (hf_step_ms, ("transformers", "accelerate")),
    "Lightning, compact CNN": (lightning_step_ms, ("lightning",)),
}


@pytest.mark.parametrize("lam", [0.0, 1.0], ids=["ce step (lambda 0)", "cgc step"])
@pytest.mark.parametrize("name", list(TRAINERS))
def test_step_cost_inside_each_trainer(benchmark, device, name, lam):
    fn, needs = TRAINERS[name]
    missing = [p for p in needs if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    benchmark.group = f"{device} CGC inside the trainers"
    ms = benchmark.pedantic(lambda: fn(device, lam), rounds=1, iterations=1)
    TIMES.setdefault((device, name), {})["cgc" if lam else "ce"] = ms


def table() -> str:
    lines = ["| device | trainer | CE step (ms) | CGC step (ms) | CGC / CE |", "|---|---|---:|---:|---:|"]
    for (dev, name), t in TIMES.items():
        if {"ce", "cgc"} <= t.keys():
            lines.append(f"| {dev} | {name} | {t['ce']:.1f} | {t['cgc']:.1f} | {t['cgc'] / t['ce']:.2f}× |")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if TIMES:
        publish(
            request.config.pluginmanager.get_plugin("terminalreporter"),
            "CGC inside the trainers: median optimizer step, batch 32 at 64 px",
            table(),
            "CGC_BENCH_INTEGRATIONS_TABLE",
        )
