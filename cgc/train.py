"""``python -m cgc.train``: train a classifier with the CGC loss (or the CE / MSE baselines).

One step, following METHOD.md and DESIGN.md: the loader gives the original view ``x``; on the
device a random crop/flip ``theta`` makes ``x_aug`` and an independent one makes ``x_ce`` (file
datasets give ``x_ce`` from the loader, cut from the decoded image); every image's crops and
flips are drawn from (seed, epoch, its index). With ``--unlabeled`` the CGC term comes from
unlabeled images instead (the semi-supervised recipe). The three views go through the model in
one batch; CE on all three; the CAM (target = class predicted on ``x``) of ``x`` and ``x_aug``
with ``create_graph=True``; ``lambda * CGC`` of the two heatmaps.

One process, or one per GPU / CPU worker under ``torchrun`` (DistributedDataParallel,
:mod:`cgc.distributed`): ``--batch-size`` is the global batch, global batch ``k`` holds the
same images for any number of processes, and the InfoNCE negatives are the whole global batch,
so a recipe trains the same model on 1 or N processes. Every epoch: validation top-1/top-5
(sharded over the processes), a JSONL log line, atomic checkpoints (``last.pt``, ``best.pt``),
and with ``--checkpoint-every`` in the middle of epochs too; SIGTERM saves and stops; a
restarted torchrun worker resumes by itself. At the end: ``metrics.json``, a table, overlay
and curve PNGs. Only the first process writes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, distributed, metrics, transforms, viz
from .cam import GradCAM, to_channels_last
from .cam_methods import CAM_METHODS
from .cli import exit_on_error
from .errors import ConfigError, Preempted, TrainingFailed
from .losses import CGCLoss
from .models import NORMS, build_model, classifier_head
from .progress import progress
from .runlog import RunLog
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
                   help="any tree of images: CGC loss on them (target = predicted class), CE on the labelled set; "
                        "'rest': the training images that --samples-per-class / --train-fraction left out, without "
                        "their labels; 'all': every training image, the labelled ones too, without labels (the "
                        "paper's semi-supervised recipe)")
    g.add_argument("--unlabeled-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--image-size", type=int, default=None, help="input size (default: the dataset's, 64 for synthetic)")
    g.add_argument("--train-size", type=int, default=6000, help="synthetic: training images")
    g.add_argument("--val-size", type=int, default=1000, help="synthetic: validation images")
    g.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes (2-12)")
    g.add_argument("--classes", default=None, metavar="NAMES",
                   help="synthetic: the shapes to classify, comma-separated (e.g. for transfer experiments: "
                        "pretrain on some shapes, fine-tune on others); default: the first --num-classes of "
                        + ", ".join(data.synthetic.CLASS_SHAPES))
    g.add_argument("--workers", type=int, default=None,
                   help="loader worker processes (default: 0 for in-memory datasets, else 4)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="compact",
                   help="'compact', a torchvision model name (resnet18, ...) or timm:NAME (needs timm)")
    g.add_argument("--norm", default="batch", choices=NORMS,
                   help="compact model: BatchNorm or GroupNorm (no batch statistics)")
    g.add_argument("--pretrained", action="store_true", help="torchvision's / timm's ImageNet weights (needs internet)")
    g.add_argument("--weights", default=None, help="local state dict (.pth, .pt or .safetensors) to start from")
    g.add_argument("--new-head", action="store_true",
                   help="with --weights: a fresh classifier head even when the weights' head has the right size "
                        "(fine-tuning on other classes)")
    g.add_argument("--compact-stride", type=int, default=8, choices=(4, 8),
                   help="compact model: downsampling to the CAM layer (8: 8x8 heatmaps at 64 px; 4: 16x16)")
    g.add_argument("--target-layer", default=None, help="CAM layer (dotted name; default: last conv stage)")
    g.add_argument("--cam", default="gradcam", choices=tuple(CAM_METHODS),
                   help="CAM method of the CGC term and the explanations (hirescam: the authors' element-wise "
                        "CAM; equal to gradcam when global pooling and a linear head follow the layer)")
    g.add_argument("--cam-weighting", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="sgd (with --momentum, the reference recipe) or adamw (betas (momentum, 0.999))")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=32,
                   help="global batch: under torchrun each of the N processes takes batch-size / N")
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
    g.add_argument("--vflip", action="store_true",
                   help="the augmented view is also flipped vertically with probability 0.5 (the recipe: horizontal only)")
    g.add_argument("--heatmap-padding", default="border", choices=("border", "zeros"),
                   help="padding of the heatmap warp outside the original's edge")
    g.add_argument("--ce-crop-scale", type=float, nargs=2, default=(0.25, 1.0), metavar=("MIN", "MAX"),
                   help="area range of the x_ce crop (of the decoded image for file datasets; 0.08 1 is the recipe)")
    g.add_argument("--backend", default=None, help="ops backend (default: $CGC_BACKEND or auto)")
    g = p.add_argument_group("distributed (under torchrun)")
    g.add_argument("--negatives", default="global", choices=("global", "local"),
                   help="InfoNCE negatives: the whole global batch, or each process's own share (the authors' "
                        "DataParallel behaviour, for the ablation)")
    g.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm: batch statistics over all processes (CUDA only; on CPUs use --norm group)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=("auto", "off", "bf16"),
                   help="bf16: forward and backward under bfloat16 autocast (the CGC loss stays in float32); auto: "
                        "bf16 where the device computes it fast (GPUs from Ampere on, CPUs with AMX or AVX512-BF16), "
                        "else off")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log to OUT/tensorboard (scalars per step and epoch, the overlays; needs tensorboard)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms for the run: bit-identical reruns on GPUs "
                        "too (the ops' auto backend then avoids the CUDA kernels that sum with atomics)")
    g.add_argument("--out", default="runs/cgc", help="output folder")
    g.add_argument("--resume", default=None,
                   help="checkpoint file or run folder to continue from; 'auto': OUT/last.pt if it exists "
                        "(restarted torchrun workers do this by themselves)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also write OUT/last.pt every N steps, in the middle of epochs (0: at epoch ends only)")
    g.add_argument("--overlays", type=int, default=16, help="val images in the overlay PNG")
    g.add_argument("--val-every", type=int, default=1, metavar="K",
                   help="validate every K epochs and after the last (tiny training sets: many short epochs)")
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
    if args.checkpoint_every < 0 or args.val_every < 1:
        p.error("--checkpoint-every must be >= 0 and --val-every >= 1")
    if args.unlabeled == "rest" and not (args.samples_per_class or args.train_fraction):
        p.error("--unlabeled rest needs --samples-per-class or --train-fraction (the rest of what?)")
    if args.new_head and not args.weights:
        p.error("--new-head goes with --weights")
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every step does besides the model and the schedule: the crops of the augmented
    (``crop_scale``; also flipped vertically with ``vflip``) and CE (``ce_crop_scale``) views,
    keyed by ``seed``; mixed precision; the ops backend; channels-last input batches."""

    seed: int = 0
    crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE
    ce_crop_scale: tuple[float, float] = (0.25, 1.0)
    amp: str = "off"
    backend: str | None = None
    channels_last: bool = False
    vflip: bool = False


@dataclasses.dataclass
class EpochState:
    """Where an epoch stands: the next ``step``, the sums over its steps of the losses (means
    over the global batch), how many steps ran and how many unreadable images were skipped.
    Saved in mid-epoch checkpoints, so a resumed epoch logs the same numbers."""

    epoch: int
    step: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: int = 0
    skipped: int = 0


def autocast(device: torch.device, amp: str):
    """The mixed-precision context of ``--amp`` (a no-op context for ``off``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware: CUDA GPUs from Ampere
    (compute capability 8) on, CPUs with AMX or AVX512-BF16 (elsewhere bfloat16 is emulated and
    slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``--amp``: ``auto`` becomes ``bf16`` where the device has fast bfloat16, else ``off``;
    ``bf16`` on a CUDA device without bfloat16 is an error."""
    if amp == "auto":
        return "bf16" if fast_bfloat16(device) else "off"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support")
    return amp


def loader_workers(workers: int | None, in_memory: bool) -> int:
    """``--workers``, or its default: none for in-memory datasets (slices are cheap), 4 for files."""
    return workers if workers is not None else (0 if in_memory else 4)


def batches(dataset, sampler, workers: int):
    """``(images, labels, [x_ce,] indices)`` batches of ``dataset`` in ``sampler``'s order
    (a batch sampler: this process's share of each global batch)."""
    return torch.utils.data.DataLoader(data.WithIndex(dataset), batch_sampler=sampler, num_workers=workers,
                                       pin_memory=torch.cuda.is_available())


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


def crop_thetas(keys_of, shape: tuple[int, int], scale, device, *, vflip: bool = False) -> torch.Tensor:
    """Affine maps [B,2,3] of keyed random crops/flips of ``shape`` images (``keys_of``: the
    samples' keys, :func:`cgc.transforms.sample_keys`); ``vflip``: vertical flips too."""
    H, W = shape
    return transforms.random_crop_flip(len(keys_of), H, W, scale=tuple(scale), keys=keys_of, device=device,
                                       vflip_p=0.5 if vflip else 0.0).theta()


def train_epoch(model, term: CGCTerm | None, opt, schedule: Schedule, recipe: Recipe, loader, state: EpochState, *,
                steps_per_epoch: int, device, ctx: distributed.Context, unlabeled=None, min_images: int = 1,
                may_drop: bool = False, stop=lambda: False, on_step=None, desc: str = "") -> EpochState:
    """Train from ``state`` to the end of its epoch: one optimizer step per batch of
    ``loader`` (this process's share of each global batch) with ``unlabeled`` batches beside
    them. After each step ``on_step(state, values, stop)`` gets the step's losses averaged over
    the global batch and whether any process's ``stop()`` said so, from one all-reduce (it
    logs, checkpoints, or ends the run). ``may_drop``: batches can lose unreadable images, and
    a step that leaves fewer than ``min_images`` on some process is skipped by all of them."""
    model.train()
    bar = progress(loader, desc, total=steps_per_epoch, initial=state.step, disable=not ctx.primary)
    for batch in bar:
        step = state.step
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(state.epoch, step, steps_per_epoch) * group.get("lr_scale", 1.0)
        (x, y, *x_ce, idx), bad = data.drop_unreadable(batch)
        u = u_idx = None
        if unlabeled is not None:
            (u, _, u_idx), bad_u = data.drop_unreadable(next(unlabeled))
            bad += bad_u
        if may_drop:
            few = len(y) < min_images or (u is not None and len(u) < min_images)
            counts = ctx.all_reduce_sum(torch.tensor([bad, float(few)], dtype=torch.float64, device=device))
            state.skipped += int(counts[0])
            if counts[1] > 0:  # every process skips the step together (their collectives must match)
                state.step += 1
                continue
        x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        x_ce = data.normalize(x_ce[0].to(device, non_blocking=True)) if x_ce else None
        size = tuple(x.shape[-2:])
        seed, epoch = recipe.seed, state.epoch
        theta = crop_thetas(transforms.sample_keys(seed, epoch, idx.tolist(), "aug"), size, recipe.crop_scale, device,
                            vflip=recipe.vflip)
        ce_theta = None if x_ce is not None else crop_thetas(
            transforms.sample_keys(seed, epoch, idx.tolist(), "ce"), size, recipe.ce_crop_scale, device)
        u_theta = None
        if u is not None:
            u = data.normalize(u.to(device, non_blocking=True))
            u_theta = crop_thetas(transforms.sample_keys(seed, epoch * steps_per_epoch + step, u_idx.tolist(),
                                                         "unlabeled"), size, recipe.crop_scale, device,
                                  vflip=recipe.vflip)
        with autocast(device, recipe.amp):
            losses = train_step(model, term, x, y, lam=schedule.lambda_at(epoch, step, steps_per_epoch),
                                theta=theta, ce_theta=ce_theta, x_ce=x_ce, unlabeled=u, unlabeled_theta=u_theta,
                                backend=recipe.backend, channels_last=recipe.channels_last)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        keys = sorted(losses)
        local = torch.stack([losses[k].detach().double() for k in keys] +
                            [torch.tensor(float(stop()), dtype=torch.float64, device=device)])
        *means, stopping = (ctx.all_reduce_sum(local) / ctx.world_size).tolist()
        values = dict(zip(keys, means))
        if not math.isfinite(values["loss"]):
            raise TrainingFailed(f"the loss became {values['loss']} in epoch {epoch + 1}, step {step}; nothing was "
                                 f"saved for this epoch. Lower --lr or --lambda.")
        for k, v in values.items():
            state.sums[k] = state.sums.get(k, 0.0) + v
        state.steps += 1
        state.step += 1
        bar.set_postfix({k: f"{v / state.steps:.4g}" for k, v in state.sums.items() if k != "top1"}, refresh=False)
        if on_step is not None:
            on_step(state, values, stopping > 0)
    if not state.steps:
        raise TrainingFailed(f"no batch of epoch {state.epoch + 1} had enough readable images; check the image "
                             f"files (warnings above name the unreadable ones)")
    return state


@torch.no_grad()
def validate(model, loader, device, ctx: distributed.Context, amp: str = "off") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) in eval mode over the readable val images of every process
    (``loader`` holds this process's share)."""
    counts = {"top1": 0.0, "top5": 0.0, "n": 0.0}
    with metrics.eval_mode(model), autocast(device, amp):
        for batch in loader:
            (x, y, _), _ = data.drop_unreadable(batch)
            if not len(y):
                continue
            x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device)
            for k, c in metrics.topk_correct(model(x), y).items():
                counts[f"top{k}"] += c
            counts["n"] += y.shape[0]
    counts = ctx.sum_values(counts)
    if not counts["n"]:
        raise TrainingFailed("no val image could be read (the warnings above name them)")
    return {"val_top1": 100 * counts["top1"] / counts["n"], "val_top5": 100 * counts["top5"] / counts["n"]}


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


def distribute(model, ctx: distributed.Context, *, sync_bn: bool):
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the processes;
    with ``sync_bn`` its BatchNorms made SyncBatchNorm), or as it is for one process."""
    if sync_bn:
        if ctx.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices: SyncBatchNorm has no CPU kernel. On CPUs use "
                              "--norm group (the compact model), whose statistics do not depend on the batch split")
        if not ctx.distributed:
            raise ConfigError("--sync-bn needs more than one process (torchrun --nproc_per_node N)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not ctx.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda"
                                                     else None)


#: explanation metrics measured at the end of every run (the rest: python -m cgc.evaluate)
EXPLANATION_METRICS = ("content_heatmap", "pointing_game", "consistency", "consistency_iou")


def results_table(results: dict, chosen: list) -> str:
    """The run's final numbers as a table: what each one is, which way is better, its value."""
    rows = [("val top-1 (%) ↑", results["val_top1"], ".2f", "accuracy on the validation images, last epoch"),
            ("val top-5 (%) ↑", results["val_top5"], ".2f", "the label among the 5 highest scores"),
            ("best val top-1 (%) ↑", results["best_val_top1"], ".2f", "best epoch (best.pt)")]
    rows += [(m.label + m.arrow, results.get(m.name), m.fmt, m.about) for m in chosen]
    rows.append(("wall time (s)", results["wall_time_s"], ".0f", f"{results['processes']} process(es)"))
    cells = [(label, "—" if v is None else format(v, fmt), about) for label, v, fmt, about in rows]
    w0, w1 = max(len(c[0]) for c in cells), max(len(c[1]) for c in cells)
    line = f"+{'-' * (w0 + 2)}+{'-' * (w1 + 2)}+"
    body = [f"| {a:<{w0}} | {b:>{w1}} | {c}" for a, b, c in cells]
    return "\n".join([line, *body, line, "↑ higher is better, ↓ lower is better"])


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


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs, SIGTERM (how SLURM preempts, and how torchrun stops workers) only
    sets the flag it yields; the loop saves a checkpoint and stops after the current step.
    (Outside the main thread signals cannot be caught: the flag then stays down.)"""
    flag = {"stop": False}
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
    except ValueError:
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> dict:
    """``python -m cgc.train``: parse the flags and run (see :func:`run`); a library error ends
    the process with one ``error: ...`` line."""
    args = parse_args(argv)
    with exit_on_error(), deterministic(args.deterministic):
        ctx = distributed.init(args.device)
        try:
            return run(args, ctx)
        finally:
            distributed.shutdown(ctx)


def resume_source(resume: str | None, out: Path) -> Path | None:
    """The checkpoint to continue from: ``OUT/last.pt`` in a restarted torchrun worker or with
    ``--resume auto`` (when it exists), else ``--resume``."""
    last = out / "last.pt"
    if distributed.restarted() and last.is_file():
        return last
    if resume == "auto":
        return last if last.is_file() else None
    return Path(resume) if resume else None


def run(args, ctx: distributed.Context | None = None) -> dict:
    """The command: build the data, model, optimizer, CGC term and schedule from the flags,
    train and validate every epoch with atomic checkpoints, then measure the explanations and
    write the metrics, overlays and curves of the run to ``--out`` (the first process only)."""
    started = time.time()
    ctx = ctx or distributed.Context(distributed.pick_device(args.device))
    device = ctx.device
    amp = resolve_amp(args.amp, device)
    unlabeled_size = args.unlabeled_batch_size or args.batch_size
    for flag, size in (("--batch-size", args.batch_size), ("--unlabeled-batch-size", unlabeled_size)):
        if size % ctx.world_size:
            raise ConfigError(f"{flag} {size} is the global batch and must divide evenly over the "
                              f"{ctx.world_size} processes")
    gathered = args.negatives == "global" and ctx.distributed
    if args.loss == "cgc" and not gathered and min(args.batch_size, unlabeled_size) // ctx.world_size < 2:
        raise ConfigError("--negatives local needs at least 2 images per process (the others are the negatives)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    bundle = data.build(args.dataset, seed=args.seed, image_size=args.image_size, train_size=args.train_size,
                        val_size=args.val_size, num_classes=args.num_classes, root=args.data,
                        strict=args.strict, ce_crop_scale=tuple(args.ce_crop_scale),
                        classes=args.classes.split(",") if args.classes else None)
    unlabeled = (data.unlabeled_images(args.unlabeled, bundle.image_size, strict=args.strict)
                 if args.unlabeled and args.unlabeled not in ("rest", "all") else None)
    unlabeled_in_memory = unlabeled is None and bundle.in_memory  # files can be unreadable; memory cannot
    full = bundle.train
    if args.samples_per_class or args.train_fraction:
        bundle.train = data.limit(full, per_class=args.samples_per_class, fraction=args.train_fraction, seed=args.seed)
        if args.unlabeled == "rest":
            unlabeled = data.WithoutLabels(data.take(full, sorted(set(range(len(full))) - set(bundle.train.indices))))
        if ctx.primary:
            data.write_file_list(out / "train_files.txt", bundle.train)
    if args.unlabeled == "all":
        unlabeled = data.WithoutLabels(full)
    steps_per_epoch = len(bundle.train) // args.batch_size
    if not steps_per_epoch:
        raise ConfigError(f"--batch-size {args.batch_size} is larger than the {len(bundle.train)} training images")
    model = build_model(args.arch, len(bundle.classes), pretrained=args.pretrained, weights=args.weights,
                        norm=args.norm, new_head=args.new_head, stride=args.compact_stride).to(device)
    channels_last = device.type == "cpu"  # oneDNN's native layout: ~1.5x faster convolutions
    if channels_last:
        to_channels_last(model)
    opt = build_optimizer(model, args.optimizer, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, head_lr=args.head_lr)
    schedule = Schedule(args.lr, args.epochs, args.schedule, args.warmup_epochs, args.lr_step, args.lr_gamma,
                        args.lam, args.lambda_warmup_epochs)
    recipe = Recipe(args.seed, tuple(args.crop_scale), tuple(args.ce_crop_scale), amp, args.backend,
                    channels_last, args.vflip)
    start, best, history, global_step = EpochState(0), -1.0, [], 0
    source = resume_source(args.resume, out)
    if source is not None:
        ckpt = checkpoint.load(source)
        if ckpt["args"]["arch"] != args.arch or ckpt["args"]["dataset"] != args.dataset:
            raise ConfigError(f"{source} is a {ckpt['args']['arch']} on {ckpt['args']['dataset']}, "
                              f"not a {args.arch} on {args.dataset}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        checkpoint.set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        start = EpochState(ckpt["epoch"], **ckpt.get("epoch_state", {}))
        best, history, global_step = ckpt["best_top1"], list(ckpt["history"]), ckpt.get("global_step", 0)
        if ctx.primary:
            where = f"epoch {start.epoch}, step {start.step}" if start.step else f"the end of epoch {start.epoch}"
            print(f"resumed from {source} at {where}", file=sys.stderr)

    cam = GradCAM(model, args.target_layer, method=args.cam, backend=args.backend, channels_last=channels_last)
    net = distribute(model, ctx, sync_bn=args.sync_bn)
    prefix = "module." if net is not model else ""
    gather = ctx.gather if gathered else None
    term = None if args.loss == "ce" else CGCTerm(
        net, prefix + cam.target_layer, method=args.cam, backend=args.backend, channels_last=channels_last,
        loss=CGCLoss(args.temperature, args.heatmap_size, kind="infonce" if args.loss == "cgc" else "mse",
                     backend=args.backend, gather=gather, padding_mode=args.heatmap_padding))
    workers = loader_workers(args.workers, bundle.in_memory)
    val_loader = batches(bundle.val, distributed.GlobalBatchSampler(
        len(bundle.val), args.batch_size, rank=ctx.rank, world_size=ctx.world_size, shuffle=False,
        drop_last=False), workers)
    min_images = 2 if args.loss == "cgc" and not gathered else 1
    if ctx.primary:
        procs = f", {ctx.world_size} processes (global batch {args.batch_size})" if ctx.distributed else ""
        precision = "bfloat16 autocast" if amp == "bf16" else "float32"
        why = " (--amp auto: this device has fast bfloat16)" if args.amp == "auto" and amp == "bf16" else \
            " (--amp auto: no fast bfloat16 on this device)" if args.amp == "auto" else ""
        print(f"cgc.train: {args.arch} on {args.dataset} ({len(bundle.train)} train / {len(bundle.val)} val, "
              f"{len(bundle.classes)} classes, {bundle.image_size}px), loss={args.loss}, device={device}{procs}, "
              f"{precision}{why}, {args.cam} at '{cam.target_layer}'"
              + (f", {len(unlabeled)} unlabeled images" if unlabeled is not None else ""), file=sys.stderr)

    def save(state: EpochState, name: str = "last.pt", *, finished: bool = False) -> None:
        """Checkpoint at ``state`` (every process's RNG state; the first process writes)."""
        rngs = ctx.all_gather_object(checkpoint.rng_state())
        if not ctx.primary:
            return
        payload = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                   "epoch": state.epoch + 1 if finished else state.epoch, "global_step": global_step,
                   "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                   "classes": bundle.classes, "image_size": bundle.image_size, "target_layer": cam.target_layer,
                   "rng": rngs,
                   "best_top1": best, "history": history}
        if not finished:
            payload["epoch_state"] = {"step": state.step, "sums": state.sums, "steps": state.steps,
                                      "skipped": state.skipped}
        checkpoint.save_atomic(payload, out / name)

    log = RunLog(out, history=history, global_step=global_step, tensorboard=args.tensorboard) if ctx.primary else None
    try:
        with stop_on_sigterm() as sigterm:
            def on_step(state: EpochState, values: dict[str, float], stopping: bool) -> None:
                nonlocal global_step
                global_step += 1
                if log is not None:
                    log.step(global_step, {"epoch": state.epoch + 1, "lr": opt.param_groups[0]["lr"],
                                           "lambda": schedule.lambda_at(state.epoch, state.step - 1, steps_per_epoch),
                                           **values})
                periodic = args.checkpoint_every and global_step % args.checkpoint_every == 0
                if stopping:
                    save(state)
                    raise Preempted(f"saved {out / 'last.pt'} at epoch {state.epoch + 1}, step {state.step}; "
                                    f"continue with --resume {out} (restarted torchrun workers resume by themselves)")
                if periodic and state.step < steps_per_epoch:
                    save(state)

            for epoch in range(start.epoch, args.epochs):
                state = start if epoch == start.epoch else EpochState(epoch)
                data.set_epoch(bundle.train, epoch, args.seed)
                loader = batches(bundle.train, distributed.GlobalBatchSampler(
                    len(bundle.train), args.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=args.seed,
                    epoch=epoch, start=state.step), workers)
                u_batches = None if unlabeled is None else iter(batches(unlabeled, data.CyclingBatchSampler(
                    len(unlabeled), args.seed + 1, unlabeled_size, rank=ctx.rank, world_size=ctx.world_size,
                    start=epoch * steps_per_epoch + state.step), loader_workers(args.workers, unlabeled_in_memory)))
                t0 = time.time()
                state = train_epoch(net, term, opt, schedule, recipe, loader, state, steps_per_epoch=steps_per_epoch,
                                    device=device, ctx=ctx, unlabeled=u_batches, min_images=min_images,
                                    may_drop=not bundle.in_memory or not unlabeled_in_memory,
                                    stop=lambda: sigterm["stop"], on_step=on_step,
                                    desc=f"epoch {epoch + 1}/{args.epochs}")
                record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "time_s": round(time.time() - t0, 2)}
                record.update({f"train_{k}": v / state.steps for k, v in state.sums.items()})
                if not bundle.in_memory:
                    record["train_skipped"] = state.skipped
                if state.skipped and ctx.primary:
                    warnings.warn(f"epoch {epoch + 1}: skipped {state.skipped} unreadable images (named in the "
                                  f"warnings above; --strict stops at the first)", stacklevel=1)
                record["train_top1"] *= 100
                checked = (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs
                if checked:
                    record.update(validate(model, val_loader, device, ctx, amp))
                history.append(record)
                improved = checked and record["val_top1"] > best
                best = max(best, record.get("val_top1", best))
                save(state, finished=True)
                if improved:
                    save(state, "best.pt", finished=True)
                if log is not None:
                    log.epoch(record, global_step)
                    val = f", val top-1 {record['val_top1']:.2f} %, top-5 {record['val_top5']:.2f} %" if checked else ""
                    print(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}{val} ({record['time_s']:.0f} s)",
                          file=sys.stderr)
    except BaseException:
        if log is not None:
            log.close()
        raise

    results = {k: history[-1][k] for k in ("val_top1", "val_top5")}
    results["best_val_top1"] = best
    chosen = metrics.select(list(EXPLANATION_METRICS), has_boxes=hasattr(bundle.val, "boxes"))
    # the evaluation protocol's crops (0.08-1), whatever --crop-scale trained with: comparable across recipes
    results.update(metrics.explanation_metrics(cam, bundle.val, device, metrics=chosen, settings=metrics.Settings(),
                                               rank=ctx.rank, world_size=ctx.world_size, reduce=ctx.sum_values))
    if ctx.primary and hasattr(bundle.val, "boxes"):
        viz.save_overlays(out / "overlays.png", [cam], [f"{args.cam} (predicted class)"], bundle.val, device,
                          args.overlays, bundle.classes)
        log.image("overlays", out / "overlays.png", global_step)
    results.update({"loss": args.loss, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs,
                    "processes": ctx.world_size, "amp": amp, "wall_time_s": round(time.time() - started, 1)})
    cam.close()
    if term is not None:
        term.close()
    if ctx.primary:
        viz.plot_curves(out / "curves.png", {
            "training loss": {k.removeprefix("train_"): [(r["epoch"], r[k]) for r in history]
                              for k in ("train_loss", "train_ce", "train_cgc", "train_cgc_unlabeled")
                              if k in history[0]},
            "accuracy (%)": {k: [(r["epoch"], r[k]) for r in history if k in r] for k in ("train_top1", "val_top1")}})
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        log.close()
        print(results_table(results, chosen))
        print(f"wrote {out}/metrics.json, log.jsonl, steps.jsonl, last.pt, best.pt, overlays.png, curves.png",
              file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
