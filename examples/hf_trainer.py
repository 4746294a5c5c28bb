"""Fine-tune a Hugging Face image classifier with CGC in the Trainer, on the built-in dataset.

    python examples/hf_trainer.py --model runs/vit-base-shapes/hf_model --out runs/hf-cgc

``--model``: a ``save_pretrained`` folder (docs/integrations.md pretrains one on six shapes),
fine-tuned on six others. ``--lambda 0`` is the plain Trainer. Needs ``pip install "cgc[hf]"``.
"""

import argparse

import torch
from transformers import AutoModelForImageClassification

from cgc import CAM, data, metrics
from cgc.integrations.huggingface import CGCTrainer, CGCTrainingArguments

SHAPES = ("star", "tee", "crescent", "cross", "semicircle", "hexagon")


def as_dicts(split):  # the batches an image classifier takes: pixel_values and labels
    pairs = (split[i] for i in range(len(split)))
    return [{"pixel_values": data.normalize(x[None])[0], "labels": y} for x, y in pairs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a save_pretrained folder")
    p.add_argument("--out", default="runs/hf-cgc")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the CGC term (0: plain Trainer)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-size", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    bundle = data.build(
        "synthetic", seed=a.seed, image_size=64, train_size=3000, val_size=a.val_size, classes=list(SHAPES)
    )
    train = data.limit(bundle.train, per_class=a.per_class, seed=a.seed)
    model = AutoModelForImageClassification.from_pretrained(
        a.model, num_labels=len(SHAPES), ignore_mismatched_sizes=True
    )
    args = CGCTrainingArguments(
        output_dir=a.out, num_train_epochs=a.epochs, per_device_train_batch_size=30, learning_rate=a.lr,
        seed=a.seed, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=10,
        cgc_lambda=a.lam,  # every other cgc_* setting: the command line's default
    )  # fmt: skip
    trainer = CGCTrainer(model=model, args=args, train_dataset=as_dicts(train))
    trainer.train()
    with CAM(model.eval()) as cam:
        chosen = metrics.select(["top1", "consistency", "consistency_iou", "content_heatmap"])
        found = metrics.explanation_metrics(cam, bundle.val, args.device, metrics=chosen)
    ran = trainer.term_outcome()
    print({k: round(v, 4) for k, v in found.items()}, "term:", ran.summary() if ran else "none (lambda 0)")
    return found


if __name__ == "__main__":
    main()
