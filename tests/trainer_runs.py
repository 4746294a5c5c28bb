"""Short training runs in the trainers cgc integrates with, for tests/test_integrations.py: in this
process, or on two (``torchrun`` for Hugging Face's ``Trainer``, Lightning's own
``strategy="ddp"``). Each run writes its final weights (``weights.pt``), its logs
(``logs.json``) and its gate's state (``gate.json``) to ``--out``.

    python -m tests.trainer_runs hf --out DIR [--lam 1] [--steps 4] [--batch 8] ...
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from cgc import data, distributed

CLASSES, SIZE = 4, 32


class Images(torch.utils.data.Dataset):
    """The built-in dataset's images, normalized, as ``{"pixel_values", "labels"}`` (Hugging
    Face) or ``(images, labels)`` (Lightning)."""

    def __init__(self, n: int, seed: int, as_dict: bool):
        bundle = data.build("synthetic", seed=seed, image_size=SIZE, train_size=n, val_size=8, num_classes=CLASSES)
        self.x, self.y = data.normalize(bundle.train.images), bundle.train.labels
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x, y = self.x[i], int(self.y[i])
        return {"pixel_values": x, "labels": y} if self.as_dict else (x, y)


def tiny_vit(seed: int):
    """A small Hugging Face ViT at 32 px (8x8 patch tokens, LayerNorm: nothing depends on how a
    batch is split)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=SIZE, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=CLASSES,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def tiny_convnext(seed: int):
    """A small Hugging Face ConvNeXt (LayerNorm too). transformers 5 saves a ViT's checkpoints
    under its older key names and its ``Trainer`` does not map them back on resume (the weights
    stay as initialized, with a warning), so the resume test trains this one."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES)
    return transformers.ConvNextForImageClassification(config)


def run_hf(args) -> dict:
    from transformers import Trainer, TrainingArguments

    from cgc.integrations.huggingface import CGCTrainer, CGCTrainingArguments

    common = dict(
        output_dir=args.out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.ga,
        max_steps=args.steps, learning_rate=1e-3, seed=args.seed, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, disable_tqdm=True,
        dataloader_drop_last=True, bf16=args.bf16, lr_scheduler_type="constant",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )  # fmt: skip
    dataset = Images(args.images, args.seed, as_dict=True)
    model = (tiny_vit if args.arch == "vit" else tiny_convnext)(args.seed)
    if args.plain:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset)
    else:
        term = dict(
            cgc_lambda=args.lam, cgc_loss=args.loss, cgc_term_gate=args.gate, cgc_lambda_warmup_epochs=args.ramp,
            cgc_negatives=args.negatives, cgc_cam_target="label", cgc_heatmap_floor=args.floor,
        )  # fmt: skip
        trainer = CGCTrainer(model=model, args=CGCTrainingArguments(**common, **term), train_dataset=dataset)
    trainer.train(resume_from_checkpoint=args.resume)
    gate = trainer.cgc.state_dict() if getattr(trainer, "cgc", None) is not None else None
    return {"model": trainer.model, "logs": trainer.state.log_history, "gate": gate}


def run_lightning(args) -> dict:
    import lightning as L

    from cgc.integrations.lightning import CGCClassifier
    from cgc.models import CompactCNN

    L.seed_everything(args.seed, verbose=False)
    torch.manual_seed(args.seed)
    net = CompactCNN(CLASSES, norm="group")
    module = CGCClassifier(
        net, lr=1e-3, lam=args.lam, loss=args.loss, term_gate=args.gate, lambda_warmup_epochs=args.ramp,
        negatives=args.negatives, seed=args.seed, cam_target="label", heatmap_floor=args.floor,
    )  # fmt: skip
    dataset = Images(args.images, args.seed, as_dict=False)

    class GlobalBatches(L.LightningDataModule):
        """Global batch k holds the same images on any number of processes, each its share in rank
        order (the crops are keyed by an image's place in the global batch)."""

        def train_dataloader(self):
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = distributed.GlobalBatchSampler(
                len(dataset), args.batch * world, rank=rank, world_size=world, seed=args.seed
            )
            return torch.utils.data.DataLoader(dataset, batch_sampler=sampler)

    saves = [
        L.pytorch.callbacks.ModelCheckpoint(args.out, "{step}", every_n_train_steps=args.save_steps, save_top_k=-1)
    ]
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps, accumulate_grad_batches=args.ga, logger=False, enable_checkpointing=bool(args.save_steps),
        callbacks=saves if args.save_steps else None,
        enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed" if args.bf16 else "32-true",
        default_root_dir=args.out, log_every_n_steps=1, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=GlobalBatches(), ckpt_path=args.resume)
    logs = {k: float(v) for k, v in trainer.logged_metrics.items()}
    gate = module.cgc.state_dict() if module.cgc is not None else None
    return {"model": net, "logs": logs, "gate": gate, "rank": trainer.global_rank}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("framework", choices=("hf", "lightning"))
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=("vit", "convnext"), default="vit", help="hf: the model")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--loss", default="cgc")
    p.add_argument("--gate", type=float, default=0.0)
    p.add_argument("--floor", type=float, default=1.0)
    p.add_argument("--ramp", type=float, default=0.0)
    p.add_argument("--negatives", default="global")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ga", type=int, default=1)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--plain", action="store_true", help="the plain Trainer, without cgc (hf)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = (run_hf if args.framework == "hf" else run_lightning)(args)
    if int(os.environ.get("RANK", result.get("rank", 0)) or 0) == 0:
        torch.save({k: v.detach().clone() for k, v in result["model"].state_dict().items()}, out / "weights.pt")
        (out / "logs.json").write_text(json.dumps(result["logs"], default=float))
        (out / "gate.json").write_text(json.dumps(result["gate"]))


if __name__ == "__main__":
    main()
