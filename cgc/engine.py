"""One training step, one epoch and validation: the loop that :mod:`cgc.train` drives.

One step (the CGC recipe, batched): the loader gives the original view ``x``; on the device a
random crop/flip ``theta`` makes ``x_aug`` and an independent one makes ``x_ce`` (file datasets
give ``x_ce`` from the loader, cut from the decoded image); every image's crops and flips are
drawn from a key of (seed, epoch, its index), so they are the same in any batch and on any
number of processes. The three views go through the model in one batch with cross-entropy on
each; the CGC term (:class:`cgc.CGCTerm`) takes the CAMs of ``x`` and ``x_aug`` for the class
predicted on ``x`` with ``create_graph=True`` and adds ``lambda * CGC``. With unlabeled images
the term comes from them instead (the semi-supervised recipe).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import data, distributed, metrics, transforms
from .checkpoint import Progress
from .errors import TrainingFailed
from .progress import progress as progress_bar
from .runtime import autocast
from .schedule import Schedule
from .term import CGCTerm


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every step does besides the model and the schedule: the crops of the augmented
    (``crop_scale``, placed by ``crop_sampler``; also flipped vertically with ``vflip``) and CE
    (``ce_crop_scale``) views, keyed by ``seed``; mixed precision (a resolved ``amp``); the ops backend; channels-last
    input batches."""

    seed: int = 0
    crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE
    ce_crop_scale: tuple[float, float] = transforms.CE_SCALE
    amp: str = "off"
    backend: str | None = None
    channels_last: bool = False
    vflip: bool = False
    crop_sampler: str = "rrc"


def batches(dataset, sampler, workers: int):
    """``(images, labels, [x_ce,] indices)`` batches of ``dataset`` in ``sampler``'s order
    (a batch sampler: this process's share of each global batch)."""
    return torch.utils.data.DataLoader(
        data.WithIndex(dataset), batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def train_step(
    model,
    term: CGCTerm | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lam: float,
    theta: torch.Tensor,
    ce_theta: torch.Tensor | None = None,
    x_ce: torch.Tensor | None = None,
    unlabeled: torch.Tensor | None = None,
    unlabeled_theta: torch.Tensor | None = None,
    backend: str | None = None,
    channels_last: bool = False,
    image_padding: str = "border",
) -> dict[str, torch.Tensor]:
    """Losses of one batch: CE on three views (``x_ce``, ``x`` and ``x_aug`` = ``x`` warped by
    ``theta``) plus ``lam`` * the CGC term (:class:`cgc.CGCTerm`; None: the CE baseline on the
    same views), all views in one forward pass.

    ``x_ce`` is cut from ``x`` by ``ce_theta`` on the device unless the loader gave it. With
    ``unlabeled`` images the CGC term is theirs (warped by ``unlabeled_theta``), the labeled
    views get only CE: the semi-supervised recipe. ``channels_last``: feed the CE baseline's
    batch in that memory format (the term's GradCAM does it for the CGC paths);
    ``image_padding``: what ``x_aug`` shows beyond ``x``'s borders where this function makes it
    (:func:`cgc.transforms.image_padding`; the term makes its own).
    """
    if x_ce is None:
        x_ce = transforms.apply(x, ce_theta, backend=backend)
    B = x.shape[0]
    out = {}
    if term is None:
        x_aug = transforms.apply(x, theta, padding_mode=image_padding, backend=backend)
        views = torch.cat([x, x_aug, x_ce])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        logits = model(views)
    elif unlabeled is None:
        cgc = term(x, theta=theta, extra=[x_ce])
        logits = torch.cat([cgc.logits, cgc.logits_aug, cgc.extra_logits[0]])
        out["cgc"] = cgc.loss
    else:
        x_aug = transforms.apply(x, theta, padding_mode=image_padding, backend=backend)
        cgc = term(unlabeled, theta=unlabeled_theta, extra=[x, x_aug, x_ce])
        logits = torch.cat(cgc.extra_logits)
        out["cgc_unlabeled"] = cgc.loss
    ce = sum(F.cross_entropy(logits[k * B : (k + 1) * B], y) for k in range(3))
    out["ce"] = ce
    out["loss"] = ce + sum(lam * v for k, v in out.items() if k.startswith("cgc"))
    out["top1"] = (logits[:B].detach().argmax(1) == y).float().mean()
    return out


def crop_thetas(
    keys_of, shape: tuple[int, int], scale, device, *, vflip: bool = False, sampler: str = "rrc"
) -> torch.Tensor:
    """Affine maps [B,2,3] of keyed random crops/flips of ``shape`` images (``keys_of``: the
    samples' keys, :func:`cgc.transforms.sample_keys`); ``vflip``: vertical flips too;
    ``sampler``: where the boxes lie (:data:`cgc.transforms.SAMPLERS`)."""
    H, W = shape
    return transforms.random_crop_flip(
        len(keys_of),
        H,
        W,
        scale=tuple(scale),
        keys=keys_of,
        device=device,
        vflip_p=0.5 if vflip else 0.0,
        sampler=sampler,
    ).theta()


@dataclasses.dataclass
class EpochLoop:
    """What one epoch needs besides the model: the optimizer, the schedule, the step recipe,
    this process's place in the job, and the loader's habits (``may_drop``: batches can lose
    unreadable images; a step left with fewer than ``min_images`` on some process is skipped by
    all of them)."""

    opt: torch.optim.Optimizer
    schedule: Schedule
    recipe: Recipe
    ctx: distributed.Context
    steps_per_epoch: int
    min_images: int = 1
    may_drop: bool = False


def train_one_epoch(
    model,
    term: CGCTerm | None,
    loop: EpochLoop,
    loader,
    progress: Progress,
    *,
    unlabeled=None,
    stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[dict, bool], None] | None = None,
    desc: str = "",
) -> Progress:
    """Train from ``progress`` to the end of its epoch: one optimizer step per batch of
    ``loader`` (this process's share of each global batch) with ``unlabeled`` batches beside
    them. After each step ``on_step(values, stopping)`` gets the step's losses averaged over
    the global batch and whether any process's ``stop()`` said so, from one all-reduce (it
    logs, checkpoints, or ends the run)."""
    ctx, opt, spe, recipe = loop.ctx, loop.opt, loop.steps_per_epoch, loop.recipe
    device = ctx.device
    model.train()
    bar = progress_bar(loader, desc, total=spe, initial=progress.step, disable=not ctx.primary)
    for batch in bar:
        step, epoch = progress.step, progress.epoch
        for group in opt.param_groups:
            group["lr"] = loop.schedule.lr_at(epoch, step, spe) * group.get("lr_scale", 1.0)
        (x, y, *x_ce, idx), bad = data.drop_unreadable(batch)
        u = u_idx = None
        if unlabeled is not None:
            (u, _, u_idx), bad_u = data.drop_unreadable(next(unlabeled))
            bad += bad_u
        if loop.may_drop:
            few = len(y) < loop.min_images or (u is not None and len(u) < loop.min_images)
            counts = ctx.all_reduce_sum(torch.tensor([bad, float(few)], dtype=torch.float64, device=device))
            progress.skipped += int(counts[0])
            if counts[1] > 0:  # every process skips the step together (their collectives must match)
                progress.step += 1
                continue
        x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        x_ce = data.normalize(x_ce[0].to(device, non_blocking=True)) if x_ce else None
        size = tuple(x.shape[-2:])
        keys = idx.tolist()
        theta = crop_thetas(
            transforms.sample_keys(recipe.seed, epoch, keys, "aug"),
            size,
            recipe.crop_scale,
            device,
            vflip=recipe.vflip,
            sampler=recipe.crop_sampler,
        )
        ce_theta = (
            None
            if x_ce is not None
            else crop_thetas(transforms.sample_keys(recipe.seed, epoch, keys, "ce"), size, recipe.ce_crop_scale, device)
        )
        u_theta = None
        if u is not None:
            u = data.normalize(u.to(device, non_blocking=True))
            u_keys = transforms.sample_keys(recipe.seed, epoch * spe + step, u_idx.tolist(), "unlabeled")
            u_theta = crop_thetas(
                u_keys, size, recipe.crop_scale, device, vflip=recipe.vflip, sampler=recipe.crop_sampler
            )
        with autocast(device, recipe.amp):
            losses = train_step(
                model,
                term,
                x,
                y,
                lam=loop.schedule.lambda_at(epoch, step, spe),
                theta=theta,
                ce_theta=ce_theta,
                x_ce=x_ce,
                unlabeled=u,
                unlabeled_theta=u_theta,
                backend=recipe.backend,
                channels_last=recipe.channels_last,
                image_padding=transforms.image_padding(recipe.crop_sampler),
            )
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        names = sorted(losses)
        local = torch.stack(
            [losses[k].detach().double() for k in names]
            + [torch.tensor(float(stop()), dtype=torch.float64, device=device)]
        )
        *means, stopping = (ctx.all_reduce_sum(local) / ctx.world_size).tolist()
        values = dict(zip(names, means))
        if not math.isfinite(values["loss"]):
            raise TrainingFailed(
                f"the loss became {values['loss']} in epoch {epoch + 1}, step {step}; nothing was "
                f"saved for this epoch. Lower --lr or --lambda."
            )
        for k, v in values.items():
            progress.sums[k] = progress.sums.get(k, 0.0) + v
        progress.steps += 1
        progress.step += 1
        progress.global_step += 1
        bar.set_postfix(
            {k: f"{v / progress.steps:.4g}" for k, v in progress.sums.items() if k != "top1"}, refresh=False
        )
        if on_step is not None:
            on_step(values, stopping > 0)
    if not progress.steps:
        raise TrainingFailed(
            f"no batch of epoch {progress.epoch + 1} had enough readable images; check the image "
            f"files (warnings above name the unreadable ones)"
        )
    return progress


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
