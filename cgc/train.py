"""``python -m cgc.train``: train a classifier with the CGC loss (or the CE / MSE baselines).

One step, following METHOD.md and DESIGN.md: the loader gives the original view ``x``; on the
device a random crop/flip ``theta`` makes ``x_aug`` and an independent one makes ``x_ce`` (file
datasets give ``x_ce`` from the loader, cut from the decoded image). With ``--unlabeled`` the
CGC term comes from unlabeled images instead (the semi-supervised recipe).
The three views go through the model in one batch; CE on all three; Grad-CAM (target = class
predicted on ``x``) of ``x`` and ``x_aug`` with ``create_graph=True``; ``lambda * CGC`` of the
two heatmaps. Every epoch: validation top-1/top-5, a JSONL log line, atomic checkpoints
(``last.pt``, ``best.pt``). At the end: ``metrics.json``, a table, overlay and curve PNGs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, metrics, transforms, viz
from .cam import GradCAM
from .cam_methods import CAM_METHODS
from .cli import exit_on_error
from .errors import ConfigError, TrainingFailed
from .losses import CGCLoss
from .models import NORMS, build_model, classifier_head
from .progress import Progress
from .term import CGCTerm

LOSSES = ("cgc", "mse", "ce")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cgc.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=data.DATASETS)
    g.add_argument("--data", default=None, metavar="ROOT",
                   help="folder of a file dataset (layouts: README, or the error of a wrong ROOT)")
    g.add_argument("--strict", action="store_true", help="stop at an unreadable image instead of skipping it")
    limited = g.add_mutually_exclusive_group()
    limited.add_argument("--samples-per-class", type=int, default=None, metavar="N",
                         help="train on N images per class (stratified, fixed by --seed; list in OUT/train_files.txt)")
    limited.add_argument("--train-fraction", type=float, default=None, metavar="F",
                         help="train on a fraction F of each class (stratified, fixed by --seed)")
    g.add_argument("--unlabeled", default=None, metavar="DIR",
                   help="any tree of images: CGC loss on them (target = predicted class), CE on the labelled set")
    g.add_argument("--unlabeled-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--image-size", type=int, default=None, help="input size (default: the dataset's, 64 for synthetic)")
    g.add_argument("--train-size", type=int, default=6000, help="synthetic: training images")
    g.add_argument("--val-size", type=int, default=1000, help="synthetic: validation images")
    g.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes (2-12)")
    g.add_argument("--workers", type=int, default=None,
                   help="loader worker processes (default: 0 for in-memory datasets, else 4)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="compact",
                   help="'compact', a torchvision model name (resnet18, ...) or timm:NAME (needs timm)")
    g.add_argument("--norm", default="batch", choices=NORMS,
                   help="compact model: BatchNorm or GroupNorm (no batch statistics)")
    g.add_argument("--pretrained", action="store_true", help="torchvision's / timm's ImageNet weights (needs internet)")
    g.add_argument("--weights", default=None, help="local state dict (.pth, .pt or .safetensors) to start from")
    g.add_argument("--target-layer", default=None, help="CAM layer (dotted name; default: last conv stage)")
    g.add_argument("--cam", default="gradcam", choices=tuple(CAM_METHODS),
                   help="CAM method of the CGC term and the explanations (hirescam: the authors' element-wise "
                        "CAM; equal to gradcam when global pooling and a linear head follow the layer)")
    g.add_argument("--cam-weighting", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="sgd (with --momentum, the reference recipe) or adamw (betas (momentum, 0.999))")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the classifier head (default: --lr), e.g. higher for a new head")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                   help="cosine: per step to 0; step: x lr-gamma every lr-step epochs")
    g.add_argument("--lr-step", type=int, default=30)
    g.add_argument("--lr-gamma", type=float, default=0.1)
    g.add_argument("--warmup-epochs", type=float, default=0.5)
    g = p.add_argument_group("CGC")
    g.add_argument("--loss", default="cgc", choices=LOSSES,
                   help="cgc: CE + lambda*InfoNCE; mse: CE + lambda*MSE (no negatives); ce: CE only")
    g.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the CGC term")
    g.add_argument("--lambda-warmup-epochs", type=float, default=3.0,
                   help="ramp lambda linearly from 0 over these epochs (0: full weight from the start)")
    g.add_argument("--temperature", type=float, default=0.2,
                   help="InfoNCE temperature (the paper's ImageNet recipe: 0.5)")
    g.add_argument("--heatmap-size", type=int, default=None, help="heatmap resolution (default: image size)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="area range of the x_aug crop")
    g.add_argument("--ce-crop-scale", type=float, nargs=2, default=(0.25, 1.0), metavar=("MIN", "MAX"),
                   help="area range of the x_ce crop (of the decoded image for file datasets; 0.08 1 is the recipe)")
    g.add_argument("--backend", default=None, help="ops backend (default: $CGC_BACKEND or auto)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="off", choices=("off", "bf16"),
                   help="bf16: forward and backward under bfloat16 autocast (GPUs from Ampere on, CPUs "
                        "with AMX or AVX512-BF16); the CGC loss itself stays in float32")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms for the run: bit-identical reruns on GPUs "
                        "too (the ops' auto backend then avoids the CUDA kernels that sum with atomics)")
    g.add_argument("--out", default="runs/cgc", help="output folder")
    g.add_argument("--resume", default=None, help="checkpoint file or run folder to continue from")
    g.add_argument("--overlays", type=int, default=16, help="val images in the overlay PNG")
    args = p.parse_args(argv)
    if args.cam_weighting is not None:
        p.error("--cam-weighting was replaced by --cam: use --cam hirescam for 'elementwise' or --cam gradcam "
                "for 'pooled'")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.loss != "ce" and args.batch_size < 2:
        p.error("--batch-size must be >= 2 for the CGC loss (the other images are the negatives)")
    if not args.lr > 0 or not args.temperature > 0:
        p.error("--lr and --temperature must be > 0")
    if args.head_lr is not None and not args.head_lr > 0:
        p.error("--head-lr must be > 0")
    if args.samples_per_class is not None and args.samples_per_class < 1:
        p.error("--samples-per-class must be >= 1")
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        p.error("--train-fraction must be in (0, 1]")
    if args.unlabeled and args.loss == "ce":
        p.error("--unlabeled needs a CGC term: use --loss cgc or mse")
    if args.unlabeled and (args.unlabeled_batch_size or args.batch_size) < 2:
        p.error("--unlabeled-batch-size must be >= 2 (the other images are the negatives)")
    return args


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Learning rate and CGC weight at every step, pure functions of the position (epoch,
    step), so a resumed run follows exactly the same schedule.

    Learning rate: linear warm-up over ``warmup_epochs``, then ``kind``: ``cosine`` (per
    step, to 0 at ``epochs``), ``step`` (x ``gamma`` every ``step_epochs``) or ``constant``.
    CGC weight: ``lam``, ramped up linearly over ``lambda_warmup_epochs`` so the explanation
    term acts once the classifier predicts.
    """

    lr: float
    epochs: int
    kind: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1
    lam: float = 1.0
    lambda_warmup_epochs: float = 0.0

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        t = epoch + step / steps_per_epoch
        if t < self.warmup_epochs:
            return self.lr * (t + 1 / steps_per_epoch) / self.warmup_epochs
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-8)
            return 0.5 * self.lr * (1 + math.cos(math.pi * min((t - self.warmup_epochs) / span, 1.0)))
        if self.kind == "step":
            return self.lr * self.gamma ** (epoch // self.step_epochs)
        return self.lr

    def lambda_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        if self.lambda_warmup_epochs <= 0:
            return self.lam
        t = epoch + (step + 1) / steps_per_epoch
        return self.lam * min(1.0, t / self.lambda_warmup_epochs)


def autocast(device: torch.device, amp: str):
    """The mixed-precision context of ``--amp`` (a no-op context for ``off``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when visible, else the CPU; a named CUDA device must be visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is visible")
    return dev


def loader_workers(workers: int | None, in_memory: bool) -> int:
    """``--workers``, or its default: none for in-memory datasets (slices are cheap), 4 for files."""
    return workers if workers is not None else (0 if in_memory else 4)


def make_loader(dataset, *, batch_size: int, workers: int, shuffle: bool, seed: int = 0, epoch: int = 0):
    """Batches of ``(uint8 images, labels, ...)``; the shuffle order depends only on (seed, epoch),
    and training drops the last partial batch."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None,
        num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=shuffle)


def unlabeled_batches(dataset, *, batch_size: int, workers: int, seed: int, start: int):
    """Batches of unlabeled images: an endless shuffled stream (reshuffled every pass) that
    starts at image ``start`` of the stream, so it continues across epochs and resumes at the
    right place."""
    sampler = data.CyclingSampler(len(dataset), seed + 1, start=start)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                            pin_memory=torch.cuda.is_available()))


def train_step(model, term: CGCTerm | None, x: torch.Tensor, y: torch.Tensor, *, lam: float,
               theta: torch.Tensor, ce_theta: torch.Tensor | None = None, x_ce: torch.Tensor | None = None,
               unlabeled: torch.Tensor | None = None, unlabeled_theta: torch.Tensor | None = None,
               backend: str | None = None, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Losses of one batch: CE on three views (``x_ce``, ``x`` and ``x_aug`` = ``x`` warped by
    ``theta``) plus ``lam`` * the CGC term (:class:`cgc.CGCTerm`; None: the CE baseline on the
    same views), all views in one forward pass.

    ``x_ce`` is cut from ``x`` by ``ce_theta`` on the device unless the loader gave it. With
    ``unlabeled`` images the CGC term is theirs (warped by ``unlabeled_theta``), the labelled
    views get only CE: the semi-supervised recipe. ``channels_last``: feed the CE baseline's
    batch in that memory format (the term's GradCAM does it for the CGC paths).
    """
    if x_ce is None:
        x_ce = transforms.apply(x, ce_theta, backend=backend)
    B = x.shape[0]
    out = {}
    if term is None:
        x_aug = transforms.apply(x, theta, backend=backend)
        views = torch.cat([x, x_aug, x_ce])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        logits = model(views)
    elif unlabeled is None:
        cgc = term(x, theta=theta, extra=[x_ce])
        logits = torch.cat([cgc.logits, cgc.logits_aug, cgc.extra_logits[0]])
        out["cgc"] = cgc.loss
    else:
        x_aug = transforms.apply(x, theta, backend=backend)
        cgc = term(unlabeled, theta=unlabeled_theta, extra=[x, x_aug, x_ce])
        logits = torch.cat(cgc.extra_logits)
        out["cgc_unlabeled"] = cgc.loss
    ce = sum(F.cross_entropy(logits[k * B:(k + 1) * B], y) for k in range(3))
    out["ce"] = ce
    out["loss"] = ce + sum(lam * v for k, v in out.items() if k.startswith("cgc"))
    out["top1"] = (logits[:B].detach().argmax(1) == y).float().mean()
    return out


@torch.no_grad()
def validate(model, loader, device, amp: str = "off") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) in eval mode, over the readable val images."""
    counts, n = {1: 0, 5: 0}, 0
    with metrics.eval_mode(model), autocast(device, amp):
        for batch in loader:
            (x, y), _ = data.drop_unreadable(batch)
            if not len(y):
                continue
            x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device)
            for k, c in metrics.topk_correct(model(x), y).items():
                counts[k] += c
            n += y.shape[0]
    if not n:
        raise TrainingFailed("no val image could be read (the warnings above name them)")
    return {"val_top1": 100 * counts[1] / n, "val_top5": 100 * counts[5] / n}


def param_groups(model, *, weight_decay: float, head_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: weight decay on weights only (not biases and norm parameters); the
    classifier head's groups carry ``lr_scale`` (--head-lr / --lr), which the schedule
    multiplies in."""
    head_name, _ = classifier_head(model)
    groups = []
    for in_head, scale in ((False, 1.0), (True, head_lr_scale)):
        for decay in (True, False):
            params = [p for n, p in model.named_parameters()
                      if n.startswith(head_name + ".") == in_head and (p.ndim > 1) == decay]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": scale})
    return groups


def build_optimizer(model, name: str, *, lr: float, momentum: float, weight_decay: float,
                    head_lr: float | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (the reference recipe) or AdamW (betas (momentum, 0.999)) over
    :func:`param_groups`; built after the head has the dataset's class count."""
    groups = param_groups(model, weight_decay=weight_decay, head_lr_scale=(head_lr or lr) / lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


def print_table(rows: dict[str, float], stream=sys.stdout) -> None:
    width = max(len(k) for k in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 12 + "+"
    print(line, file=stream)
    for k, v in rows.items():
        print(f"| {k:<{width}} | {v:>10.3f} |", file=stream)
    print(line, file=stream)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` and cuDNN without autotuning while the block
    runs (``--deterministic``), the previous settings restored after it. cuBLAS is reproducible
    only with a fixed workspace, which ``CUBLAS_WORKSPACE_CONFIG`` must set before CUDA starts:
    set here when absent (a process that already used CUDA keeps its own)."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


def main(argv=None) -> dict:
    """``python -m cgc.train``: parse the flags and run (see :func:`run`); a library error ends
    the process with one ``error: ...`` line."""
    args = parse_args(argv)
    with exit_on_error(), deterministic(args.deterministic):
        return run(args)


def run(args) -> dict:
    """The command: build the data, model, optimizer, CGC term and schedule from the flags,
    train and validate every epoch with atomic checkpoints, then measure the explanations and
    write the metrics, overlays and curves of the run to ``--out``."""
    started = time.time()
    device = pick_device(args.device)
    if args.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    bundle = data.build(args.dataset, seed=args.seed, image_size=args.image_size, train_size=args.train_size,
                        val_size=args.val_size, num_classes=args.num_classes, root=args.data,
                        strict=args.strict, ce_crop_scale=tuple(args.ce_crop_scale))
    unlabeled = (data.unlabeled_images(args.unlabeled, bundle.image_size, strict=args.strict)
                 if args.unlabeled else None)
    if args.samples_per_class or args.train_fraction:
        bundle.train = data.limit(bundle.train, per_class=args.samples_per_class, fraction=args.train_fraction,
                                  seed=args.seed)
        data.write_file_list(out / "train_files.txt", bundle.train)
    model = build_model(args.arch, len(bundle.classes), pretrained=args.pretrained, weights=args.weights,
                        norm=args.norm).to(device)
    channels_last = device.type == "cpu"  # oneDNN's native layout: ~1.5x faster convolutions
    opt = build_optimizer(model, args.optimizer, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, head_lr=args.head_lr)
    schedule = Schedule(args.lr, args.epochs, args.schedule, args.warmup_epochs, args.lr_step, args.lr_gamma,
                        args.lam, args.lambda_warmup_epochs)
    start_epoch, best, history = 0, -1.0, []
    if args.resume:
        ckpt = checkpoint.load(args.resume)
        if ckpt["args"]["arch"] != args.arch or ckpt["args"]["dataset"] != args.dataset:
            raise ConfigError(f"{args.resume} is a {ckpt['args']['arch']} on {ckpt['args']['dataset']}, "
                              f"not a {args.arch} on {args.dataset}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        checkpoint.set_rng_state(ckpt["rng"])
        start_epoch, best, history = ckpt["epoch"], ckpt["best_top1"], list(ckpt["history"])
        print(f"resumed from {args.resume} after epoch {start_epoch}", file=sys.stderr)

    cam = GradCAM(model, args.target_layer, method=args.cam, backend=args.backend, channels_last=channels_last)
    term = None if args.loss == "ce" else CGCTerm(
        model, cam.target_layer, method=args.cam, backend=args.backend, channels_last=channels_last,
        loss=CGCLoss(args.temperature, args.heatmap_size, kind="infonce" if args.loss == "cgc" else "mse",
                     backend=args.backend))
    workers = loader_workers(args.workers, bundle.in_memory)
    val_loader = make_loader(bundle.val, batch_size=args.batch_size, workers=workers, shuffle=False)
    unlabeled_size = args.unlabeled_batch_size or args.batch_size
    log_path = out / "log.jsonl"
    print(f"cgc.train: {args.arch} on {args.dataset} ({len(bundle.train)} train / {len(bundle.val)} val, "
          f"{len(bundle.classes)} classes, {bundle.image_size}px), loss={args.loss}, device={device}, "
          f"{args.cam} at '{cam.target_layer}'"
          + (f", {len(unlabeled)} unlabeled images" if unlabeled is not None else ""), file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader = make_loader(bundle.train, batch_size=args.batch_size, workers=workers, shuffle=True,
                             seed=args.seed, epoch=epoch)
        u_batches = None if unlabeled is None else unlabeled_batches(
            unlabeled, batch_size=unlabeled_size, workers=loader_workers(args.workers, False), seed=args.seed,
            start=epoch * len(loader) * unlabeled_size)
        sums: dict[str, torch.Tensor] = {}
        steps = skipped = 0
        t0 = time.time()
        bar = Progress(loader, f"epoch {epoch + 1}/{args.epochs}")
        for step, batch in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(epoch, step, len(loader)) * group.get("lr_scale", 1.0)
            (x, y, *x_ce), bad = data.drop_unreadable(batch)
            skipped += bad
            u = None
            if u_batches is not None:
                (u, _), bad = data.drop_unreadable(next(u_batches))
                skipped += bad
                u = data.normalize(u.to(device, non_blocking=True)) if len(u) >= 2 else None
            if len(y) < (1 if term is None else 2) or (u_batches is not None and u is None):
                continue  # too few readable images left (the contrastive loss needs two)
            x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            x_ce = data.normalize(x_ce[0].to(device, non_blocking=True)) if x_ce else None
            B, _, H, W = x.shape
            theta = transforms.random_crop_flip(B, H, W, scale=tuple(args.crop_scale), device=device).theta()
            ce_theta = None if x_ce is not None else transforms.random_crop_flip(
                B, H, W, scale=tuple(args.ce_crop_scale), device=device).theta()
            u_theta = None if u is None else transforms.random_crop_flip(
                u.shape[0], H, W, scale=tuple(args.crop_scale), device=device).theta()
            with autocast(device, args.amp):
                losses = train_step(model, term, x, y, lam=schedule.lambda_at(epoch, step, len(loader)),
                                    theta=theta, ce_theta=ce_theta, x_ce=x_ce, unlabeled=u, unlabeled_theta=u_theta,
                                    backend=args.backend, channels_last=channels_last)
            steps += 1
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            if bar.tty or step % 10 == 0 or step == len(loader) - 1:
                running = {k: float(v) / steps for k, v in sums.items()}
                if not math.isfinite(running["loss"]):
                    raise TrainingFailed(f"the loss became {running['loss']} in epoch {epoch + 1}, step {step}; "
                                         f"nothing was saved for this epoch (last good checkpoint: "
                                         f"{out / 'last.pt'}). Lower --lr or --lambda.")
                bar.set(**{k: v for k, v in running.items() if k != "top1"})
        if not steps:
            raise TrainingFailed(f"no batch of epoch {epoch + 1} had enough readable images; check the image "
                                 f"files (warnings above name the unreadable ones)")
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "time_s": round(time.time() - t0, 2)}
        record.update({f"train_{k}": float(v) / steps for k, v in sums.items()})
        if not bundle.in_memory:
            record["train_skipped"] = skipped
        if skipped:
            warnings.warn(f"epoch {epoch + 1}: skipped {skipped} unreadable images (named in the warnings above; "
                          f"--strict stops at the first)", stacklevel=1)
        record["train_top1"] *= 100
        record.update(validate(model, val_loader, device, args.amp))
        history.append(record)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        improved = record["val_top1"] > best
        best = max(best, record["val_top1"])
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                 "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                 "classes": bundle.classes, "target_layer": cam.target_layer,
                 "rng": checkpoint.rng_state(), "best_top1": best, "history": history}
        checkpoint.save_atomic(state, out / "last.pt")
        if improved:
            checkpoint.save_atomic(state, out / "best.pt")
        print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}, val top-1 {record['val_top1']:.2f} %, "
              f"top-5 {record['val_top5']:.2f} % ({record['time_s']:.0f} s)", file=sys.stderr)

    results = {k: history[-1][k] for k in ("val_top1", "val_top5")}
    results["best_val_top1"] = best
    if hasattr(bundle.val, "boxes"):
        explained = metrics.explanation_metrics(cam, bundle.val, device, crop_scale=tuple(args.crop_scale))
        results.update({k: explained[k] for k in ("content_heatmap", "pointing_game", "consistency",
                                                  "consistency_iou")})
        viz.save_overlays(out / "overlays.png", [cam], [f"{args.cam} (predicted class)"], bundle.val, device,
                          args.overlays, bundle.classes)
    if history:
        viz.plot_curves(out / "curves.png", {
            "training loss": {k.removeprefix("train_"): [(r["epoch"], r[k]) for r in history]
                              for k in ("train_loss", "train_ce", "train_cgc", "train_cgc_unlabeled")
                              if k in history[0]},
            "accuracy (%)": {k: [(r["epoch"], r[k]) for r in history] for k in ("train_top1", "val_top1")}})
    results.update({"loss": args.loss, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs,
                    "wall_time_s": round(time.time() - started, 1)})
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    cam.close()
    if term is not None:
        term.close()
    print_table({k: v for k, v in results.items() if isinstance(v, float)})
    print(f"wrote {out}/metrics.json, log.jsonl, last.pt, best.pt, overlays.png, curves.png", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
