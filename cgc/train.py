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
from .losses import CGCLoss
from .models import build_model, classifier_head
from .progress import Progress

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
    g.add_argument("--arch", default="compact", help="'compact' or a torchvision model name (resnet18, ...)")
    g.add_argument("--pretrained", action="store_true", help="torchvision's ImageNet weights (needs internet)")
    g.add_argument("--weights", default=None, help="local state dict to start from")
    g.add_argument("--target-layer", default=None, help="Grad-CAM layer (dotted name; default: last conv stage)")
    g.add_argument("--cam-weighting", default="elementwise", choices=("elementwise", "pooled"),
                   help="gradient x activation element-wise (the CGC recipe) or classic pooled weights")
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


def lr_at(args, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a step: linear warm-up, then the schedule; a pure function of the
    position, so a resumed run follows exactly the same schedule."""
    t = epoch + step / steps_per_epoch
    if t < args.warmup_epochs:
        return args.lr * (t + 1 / steps_per_epoch) / args.warmup_epochs
    if args.schedule == "cosine":
        span = max(args.epochs - args.warmup_epochs, 1e-8)
        return 0.5 * args.lr * (1 + math.cos(math.pi * min((t - args.warmup_epochs) / span, 1.0)))
    if args.schedule == "step":
        return args.lr * args.lr_gamma ** (epoch // args.lr_step)
    return args.lr


def autocast(device: torch.device, amp: str):
    """The mixed-precision context of ``--amp`` (a no-op context for ``off``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but no CUDA device is visible")
    return dev


def make_loader(dataset, args, bundle, *, shuffle: bool, epoch: int = 0):
    """Batches of ``(uint8 images, labels)``; the shuffle order depends only on (seed, epoch)."""
    workers = args.workers if args.workers is not None else (0 if bundle.in_memory else 4)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=shuffle, generator=gen if shuffle else None,
        num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=shuffle)


def unlabeled_batches(dataset, args, epoch: int, steps_per_epoch: int):
    """Batches of unlabeled images for one epoch: an endless shuffled stream (reshuffled every
    pass) that continues across epochs and resumes at the right place."""
    size = args.unlabeled_batch_size or args.batch_size
    workers = args.workers if args.workers is not None else 4
    sampler = data.CyclingSampler(len(dataset), args.seed + 1, start=epoch * steps_per_epoch * size)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=size, sampler=sampler, num_workers=workers,
                                            pin_memory=torch.cuda.is_available()))


def lambda_at(args, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Weight of the CGC term at a step: ``--lambda``, ramped up linearly over
    ``--lambda-warmup-epochs`` so the explanation term acts once the classifier predicts."""
    t = epoch + (step + 1) / steps_per_epoch
    return args.lam * min(1.0, t / args.lambda_warmup_epochs) if args.lambda_warmup_epochs > 0 else args.lam


def train_step(model, cam: GradCAM, loss_fn: CGCLoss | None, x: torch.Tensor, y: torch.Tensor, args,
               *, lam: float, x_ce: torch.Tensor | None = None,
               unlabeled: torch.Tensor | None = None):
    """Losses of one batch: CE on three views (x_ce, x, x_aug) and ``lam`` * CGC between the
    heatmaps of x and x_aug. ``x_ce`` is cut from ``x`` on the device unless the loader gave
    it. With ``unlabeled`` images the CGC term is theirs (the semi-supervised recipe: CE on
    the labelled batch, CGC on the unlabeled one, one forward pass for both)."""
    B, _, H, W = x.shape
    aug = transforms.random_crop_flip(B, H, W, scale=tuple(args.crop_scale), device=x.device)
    ce_view = None if x_ce is not None else transforms.random_crop_flip(
        B, H, W, scale=tuple(args.ce_crop_scale), device=x.device)
    theta = aug.theta()
    x_aug = transforms.apply(x, theta, backend=args.backend)
    if ce_view is not None:
        x_ce = transforms.apply(x, ce_view.theta(), backend=args.backend)
    views, first, n, cgc_theta, cgc_key = [x_ce, x, x_aug], B, B, theta, "cgc"
    if unlabeled is not None:
        n = unlabeled.shape[0]
        cgc_theta = transforms.random_crop_flip(n, H, W, scale=tuple(args.crop_scale), device=x.device).theta()
        views += [unlabeled, transforms.apply(unlabeled, cgc_theta, backend=args.backend)]
        first, cgc_key = 3 * B, "cgc_unlabeled"
    logits, acts = cam.forward(torch.cat(views))
    ce = sum(F.cross_entropy(logits[k * B:(k + 1) * B], y) for k in range(3))
    out = {"ce": ce}
    total = ce
    if loss_fn is not None:
        target = logits[first:first + n].detach().argmax(1)
        cams = cam.heatmaps(logits, acts, target.repeat(2), rows=slice(first, first + 2 * n), create_graph=True)
        if cams.dtype == torch.bfloat16:  # under --amp; the loss normalises and exponentiates in float32
            cams = cams.float()
        cgc = loss_fn(cams[:n], cams[n:], cgc_theta)
        out[cgc_key] = cgc
        total = total + lam * cgc
    out["loss"] = total
    out["top1"] = (logits[B:2 * B].detach().argmax(1) == y).float().mean()
    return out


@torch.no_grad()
def validate(model, loader, device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) in eval mode, over the readable val images."""
    counts, n = {1: 0, 5: 0}, 0
    with metrics.eval_mode(model):
        for batch in loader:
            (x, y), _ = data.drop_unreadable(batch)
            if not len(y):
                continue
            x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device)
            for k, c in metrics.topk_correct(model(x), y).items():
                counts[k] += c
            n += y.shape[0]
    if not n:
        raise SystemExit("error: no val image could be read (the warnings above name them)")
    return {"val_top1": 100 * counts[1] / n, "val_top5": 100 * counts[5] / n}


def param_groups(model, args) -> list[dict]:
    """Optimizer groups: weight decay on weights only; the classifier head's groups carry
    ``lr_scale`` = --head-lr / --lr, which the schedule multiplies in."""
    head_name, _ = classifier_head(model)
    head_scale = (args.head_lr or args.lr) / args.lr
    groups = []
    for in_head, scale in ((False, 1.0), (True, head_scale)):
        for decay in (True, False):
            params = [p for n, p in model.named_parameters()
                      if n.startswith(head_name + ".") == in_head and (p.ndim > 1) == decay]
            if params:
                groups.append({"params": params, "weight_decay": args.weight_decay if decay else 0.0,
                               "lr_scale": scale})
    return groups


def build_data(args, out: Path) -> tuple[data.DataBundle, torch.utils.data.Dataset | None]:
    """The dataset (limited to the requested subset, whose file list goes to
    ``OUT/train_files.txt``) and the unlabeled images, or a clear error about the folders."""
    try:
        bundle = data.build(args.dataset, seed=args.seed, image_size=args.image_size, train_size=args.train_size,
                            val_size=args.val_size, num_classes=args.num_classes, root=args.data,
                            strict=args.strict, ce_crop_scale=tuple(args.ce_crop_scale))
        unlabeled = (data.unlabeled_images(args.unlabeled, bundle.image_size, strict=args.strict)
                     if args.unlabeled else None)
    except data.LayoutError as err:
        raise SystemExit(f"error: {err}") from err
    if args.samples_per_class or args.train_fraction:
        bundle.train = data.limit(bundle.train, per_class=args.samples_per_class, fraction=args.train_fraction,
                                  seed=args.seed)
        data.write_file_list(out / "train_files.txt", bundle.train)
    return bundle, unlabeled


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
    """``python -m cgc.train``: parse the flags and run (see :func:`run`)."""
    args = parse_args(argv)
    with deterministic(args.deterministic):
        return run(args)


def run(args) -> dict:
    """Train, validate and checkpoint every epoch, then measure the explanations and write the
    metrics, overlays and curves of the run to ``--out``."""
    started = time.time()
    device = pick_device(args.device)
    if args.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"error: --amp bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    bundle, unlabeled = build_data(args, out)
    model = build_model(args.arch, len(bundle.classes), pretrained=args.pretrained,
                        weights=args.weights).to(device)
    # optimizer and checkpoint only after the head has the dataset's class count
    groups = param_groups(model, args)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.momentum, 0.999))
    start_epoch, best, history = 0, -1.0, []
    if args.resume:
        ckpt = checkpoint.load(args.resume)
        if ckpt["args"]["arch"] != args.arch or ckpt["args"]["dataset"] != args.dataset:
            raise SystemExit(f"error: {args.resume} is a {ckpt['args']['arch']} on {ckpt['args']['dataset']}, "
                             f"not a {args.arch} on {args.dataset}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        checkpoint.set_rng_state(ckpt["rng"])
        start_epoch, best, history = ckpt["epoch"], ckpt["best_top1"], list(ckpt["history"])
        print(f"resumed from {args.resume} after epoch {start_epoch}", file=sys.stderr)

    heatmap_size = args.heatmap_size or bundle.image_size
    loss_fn = None if args.loss == "ce" else CGCLoss(
        args.temperature, heatmap_size, kind="infonce" if args.loss == "cgc" else "mse", backend=args.backend)
    cam = GradCAM(model, args.target_layer, pool=args.cam_weighting == "pooled", backend=args.backend)
    val_loader = make_loader(bundle.val, args, bundle, shuffle=False)
    log_path = out / "log.jsonl"
    print(f"cgc.train: {args.arch} on {args.dataset} ({len(bundle.train)} train / {len(bundle.val)} val, "
          f"{len(bundle.classes)} classes, {bundle.image_size}px), loss={args.loss}, device={device}, "
          f"Grad-CAM layer '{cam.target_layer}'"
          + (f", {len(unlabeled)} unlabeled images" if unlabeled is not None else ""), file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader = make_loader(bundle.train, args, bundle, shuffle=True, epoch=epoch)
        u_batches = unlabeled_batches(unlabeled, args, epoch, len(loader)) if unlabeled is not None else None
        sums: dict[str, torch.Tensor] = {}
        steps = skipped = 0
        t0 = time.time()
        bar = Progress(loader, f"epoch {epoch + 1}/{args.epochs}")
        for step, batch in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(args, epoch, step, len(loader)) * group.get("lr_scale", 1.0)
            (x, y, *x_ce), bad = data.drop_unreadable(batch)
            skipped += bad
            u = None
            if u_batches is not None:
                (u, _), bad = data.drop_unreadable(next(u_batches))
                skipped += bad
                u = data.normalize(u.to(device, non_blocking=True)) if len(u) >= 2 else None
            if len(y) < (1 if loss_fn is None else 2) or (u_batches is not None and u is None):
                continue  # too few readable images left (the contrastive loss needs two)
            x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            x_ce = data.normalize(x_ce[0].to(device, non_blocking=True)) if x_ce else None
            with autocast(device, args.amp):
                losses = train_step(model, cam, loss_fn, x, y, args, x_ce=x_ce, unlabeled=u,
                                    lam=lambda_at(args, epoch, step, len(loader)))
            steps += 1
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + v.detach()
            if bar.tty or step % 10 == 0 or step == len(loader) - 1:
                running = {k: float(v) / steps for k, v in sums.items()}
                if not math.isfinite(running["loss"]):
                    raise SystemExit(f"error: the loss became {running['loss']} in epoch {epoch + 1}, step "
                                     f"{step}; nothing was saved for this epoch (last good checkpoint: "
                                     f"{out / 'last.pt'}). Lower --lr or --lambda.")
                bar.set(**{k: v for k, v in running.items() if k != "top1"})
        if not steps:
            raise SystemExit(f"error: no batch of epoch {epoch + 1} had enough readable images; check the image "
                             f"files (warnings above name the unreadable ones)")
        record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "time_s": round(time.time() - t0, 2)}
        record.update({f"train_{k}": float(v) / steps for k, v in sums.items()})
        if not bundle.in_memory:
            record["train_skipped"] = skipped
        if skipped:
            warnings.warn(f"epoch {epoch + 1}: skipped {skipped} unreadable images (named in the warnings above; "
                          f"--strict stops at the first)", stacklevel=1)
        record["train_top1"] *= 100
        with autocast(device, args.amp):
            record.update(validate(model, val_loader, device))
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
        viz.save_overlays(out / "overlays.png", [cam], ["Grad-CAM (predicted class)"], bundle.val, device,
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
    print_table({k: v for k, v in results.items() if isinstance(v, float)})
    print(f"wrote {out}/metrics.json, log.jsonl, last.pt, best.pt, overlays.png, curves.png", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
