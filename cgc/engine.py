"""One training step, one epoch and validation: the loop that :mod:`cgc.train` drives.

One step (the CGC recipe, batched): the loader gives the original view ``x``; on the device a
random crop/flip ``theta`` makes ``x_aug`` and an independent one makes ``x_ce`` (file datasets
give ``x_ce`` from the loader, cut from the decoded image); every image's crops and flips are
drawn from a key of (seed, epoch, its index), so they are the same in any batch and on any
number of processes. The three views go through the model in one batch with cross-entropy on
each; the CGC term (:class:`cgc.CGCTerm`) takes the CAMs of ``x`` and ``x_aug`` for the class
predicted on ``x`` (or the label, ``cam_target``) with ``create_graph=True`` and adds ``lambda *
CGC``. With unlabeled images the term comes from them instead (the semi-supervised recipe).
The term's weight, the class its CAMs explain and the gate (cross-entropy first) come from the
run's :class:`cgc.safeguards.Safeguards`; until the gate opens the step is the CE baseline's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import data, distributed, metrics, transforms
from .errors import TrainingFailed
from .optimization import Schedule, set_learning_rate
from .progress import progress as progress_bar
from .run_state import RunState
from .runtime import autocast
from .safeguards import Safeguards
from .structure import logits_of
from .term import CGCTerm


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How every step makes its views and runs them, besides the model and the term's settings:
    the CE view's crops (``ce_crop_scale``), keyed by ``seed``; mixed precision (a resolved
    ``amp``); the ops backend; channels-last input batches."""

    seed: int = 0
    ce_crop_scale: tuple[float, float] = transforms.CE_SCALE
    amp: str = "off"
    backend: str | None = None
    channels_last: bool = False


def batches(dataset, sampler, workers: int):
    """``(images, labels, [x_ce,] indices)`` batches of ``dataset`` in ``sampler``'s order
    (a batch sampler: this process's share of each global batch)."""
    return torch.utils.data.DataLoader(
        data.WithIndex(dataset), batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available()
    )


def train_step(
    model,
    term: CGCTerm | None,
    inputs: StepInputs,
    lam: float,
    *,
    guard: Safeguards,
    options: StepOptions = StepOptions(),
    all_reduce_sum=None,
) -> dict[str, torch.Tensor]:
    """Losses of one batch (``inputs``): CE on three views (``x_ce``, ``x`` and ``x_aug`` =
    ``x`` warped by ``theta``) plus ``lam`` * the CGC term (:class:`cgc.CGCTerm`; None: the CE
    baseline on the same views), all views in one forward pass.

    ``x_ce`` is cut from ``x`` by ``ce_theta`` on the device unless the loader gave it. With
    unlabeled images the CGC term is theirs (warped by ``unlabeled_theta``), the labeled views
    get only CE: the semi-supervised recipe. ``guard`` (the run's
    :class:`cgc.safeguards.Safeguards`) says which class the labeled images' CAMs explain (the
    predicted one on ``x`` or the label; unlabeled images': the predicted one) and bounds
    ``lam`` where the term's gradient at the CAM layer would exceed its bound times
    cross-entropy's (norms summed over processes by ``all_reduce_sum``; the weight used is
    returned as ``out["lambda"]``). ``lam == 0`` skips the term (the CE baseline's step, with
    the same views and the same gradients). ``options.channels_last``: feed the CE baseline's
    batch in that memory format (the term's CAM does it for the CGC paths).
    """
    x, y, backend = inputs.x, inputs.y, options.backend
    x_ce = inputs.x_ce if inputs.x_ce is not None else transforms.apply(x, inputs.ce_theta, backend=backend)
    padding = transforms.image_padding(guard.config.crop_sampler)
    B = x.shape[0]
    out = {}
    if term is None or lam == 0:
        x_aug = transforms.apply(x, inputs.theta, padding_mode=padding, backend=backend)
        views = torch.cat([x, x_aug, x_ce])
        if options.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        logits = logits_of(model(views))
    elif inputs.unlabeled is None:
        cgc = term(x, theta=inputs.theta, extra=[x_ce], targets=guard.targets(y))
        logits = torch.cat([cgc.logits, cgc.logits_aug, cgc.extra_logits[0]])
        out["cgc"], out["cgc_floored"] = cgc.loss, cgc.floored
    else:
        x_aug = transforms.apply(x, inputs.theta, padding_mode=padding, backend=backend)
        cgc = term(inputs.unlabeled, theta=inputs.unlabeled_theta, extra=[x, x_aug, x_ce])
        logits = torch.cat(cgc.extra_logits)
        out["cgc_unlabeled"], out["cgc_floored"] = cgc.loss, cgc.floored
    ce = sum(F.cross_entropy(logits[k * B : (k + 1) * B], y) for k in range(3))
    out["ce"] = ce
    term_loss = out.get("cgc", out.get("cgc_unlabeled"))
    if term_loss is not None and guard.config.grad_bound > 0:
        lam = out["lambda"] = guard.bounded(lam, ce, term_loss, cgc.activations, all_reduce_sum)
    out["loss"] = ce if term_loss is None else ce + lam * term_loss
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
class EpochPlan:
    """What every epoch's steps share besides the model: the optimizer, the schedule, the step
    options, the CGC term's safeguards (its crops, weight, gate and targets), this process's
    place in the job and the loader's habits (``may_drop``: batches can lose unreadable images;
    a step left with fewer than ``min_images`` on some process is skipped by all of them)."""

    opt: torch.optim.Optimizer
    schedule: Schedule
    options: StepOptions
    guard: Safeguards
    ctx: distributed.Context
    steps_per_epoch: int
    min_images: int = 1
    may_drop: bool = False


@dataclasses.dataclass
class StepInputs:
    """One step's tensors on the device: the original view ``x`` with labels ``y``, the maps
    ``theta`` of the augmented view, the CE view (``x_ce`` from the loader, or cut by
    ``ce_theta``), and the unlabeled images with their maps (None without)."""

    x: torch.Tensor
    y: torch.Tensor
    theta: torch.Tensor
    x_ce: torch.Tensor | None
    ce_theta: torch.Tensor | None
    unlabeled: torch.Tensor | None = None
    unlabeled_theta: torch.Tensor | None = None


def read_batch(batch, unlabeled, plan: EpochPlan, state: RunState):
    """``(x, y, x_ce, indices, unlabeled, unlabeled_indices)`` of a loader batch and the next
    unlabeled batch without their unreadable images (counted in ``state``), or None when some
    process has too few images left: every process skips that step together (their collectives
    must match)."""
    (x, y, *x_ce, idx), bad = data.drop_unreadable(batch)
    images = u_idx = None
    if unlabeled is not None:
        (images, _, u_idx), bad_unlabeled = data.drop_unreadable(next(unlabeled))
        bad += bad_unlabeled
    if plan.may_drop:
        too_few = len(y) < plan.min_images or (images is not None and len(images) < plan.min_images)
        counts = plan.ctx.all_reduce_sum(
            torch.tensor([bad, float(too_few)], dtype=torch.float64, device=plan.ctx.device)
        )
        state.skipped += int(counts[0])
        if counts[1] > 0:
            return None
    return x, y, x_ce[0] if x_ce else None, idx, images, u_idx


def step_inputs(read, plan: EpochPlan, epoch: int, position: int) -> StepInputs:
    """A batch from :func:`read_batch` on the plan's device, normalized, with its keyed crops:
    each image's from (seed, ``epoch``, its index), the unlabeled images' from (seed, the step's
    ``position`` in the run, their index)."""
    x, y, x_ce, idx, unlabeled, u_idx = read
    options, term, device = plan.options, plan.guard.config, plan.ctx.device
    x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
    x_ce = data.normalize(x_ce.to(device, non_blocking=True)) if x_ce is not None else None
    size, keys = tuple(x.shape[-2:]), idx.tolist()
    seed, aug = options.seed, dict(vflip=term.vflip, sampler=term.crop_sampler)
    theta = crop_thetas(transforms.sample_keys(seed, epoch, keys, "aug"), size, term.crop_scale, device, **aug)
    ce_theta = None
    if x_ce is None:
        ce_theta = crop_thetas(transforms.sample_keys(seed, epoch, keys, "ce"), size, options.ce_crop_scale, device)
    inputs = StepInputs(x, y, theta, x_ce, ce_theta)
    if unlabeled is not None:
        inputs.unlabeled = data.normalize(unlabeled.to(device, non_blocking=True))
        u_keys = transforms.sample_keys(seed, position, u_idx.tolist(), "unlabeled")
        inputs.unlabeled_theta = crop_thetas(u_keys, size, term.crop_scale, device, **aug)
    return inputs


def optimize(model, term: CGCTerm | None, inputs: StepInputs, plan: EpochPlan, lam: float) -> dict[str, torch.Tensor]:
    """One optimizer step of :func:`train_step` on ``inputs``; its losses."""
    options = plan.options
    reduce = plan.ctx.all_reduce_sum if plan.ctx.distributed else None
    with autocast(plan.ctx.device, options.amp):
        losses = train_step(model, term, inputs, lam, guard=plan.guard, options=options, all_reduce_sum=reduce)
    plan.opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    plan.opt.step()
    return losses


def reduce_losses(losses: dict[str, torch.Tensor], stop: bool, ctx: distributed.Context) -> tuple[dict, bool]:
    """The step's losses averaged over the global batch and whether any process asked to stop,
    from one all-reduce."""
    names = sorted(losses)
    local = torch.stack(
        [losses[k].detach().double() for k in names]
        + [torch.tensor(float(stop), dtype=torch.float64, device=ctx.device)]
    )
    *means, stopping = (ctx.all_reduce_sum(local) / ctx.world_size).tolist()
    return dict(zip(names, means)), stopping > 0


def train_one_epoch(
    model,
    term: CGCTerm | None,
    plan: EpochPlan,
    loader,
    state: RunState,
    *,
    unlabeled=None,
    stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[dict, bool], None] | None = None,
    desc: str = "",
) -> RunState:
    """Train from ``state`` to the end of its epoch: one optimizer step per batch of
    ``loader`` (this process's share of each global batch) with ``unlabeled`` batches beside
    them. After each step ``on_step(values, stopping)`` gets the step's losses averaged over
    the global batch and whether any process's ``stop()`` said so, from one all-reduce (it
    logs, checkpoints, or ends the run)."""
    ctx, steps_per_epoch, schedule = plan.ctx, plan.steps_per_epoch, plan.schedule
    model.train()
    bar = progress_bar(loader, desc, total=steps_per_epoch, initial=state.step, disable=not ctx.primary)
    for batch in bar:
        epoch, step = state.epoch, state.step
        set_learning_rate(plan.opt, schedule.lr_at(epoch, step, steps_per_epoch))
        read = read_batch(batch, unlabeled, plan, state)
        if read is None:
            state.step += 1
            continue
        inputs = step_inputs(read, plan, epoch, epoch * steps_per_epoch + step)
        end = epoch + (step + 1) / steps_per_epoch  # where this step ends, in epochs
        lam = plan.guard.weight(end)
        losses = optimize(model, term, inputs, plan, lam)
        values, stopping = reduce_losses(losses, stop(), ctx)
        if not math.isfinite(values["loss"]):
            raise TrainingFailed(
                f"the loss became {values['loss']} in epoch {epoch + 1}, step {step}; nothing was "
                f"saved for this epoch. Lower --lr or --lambda."
            )
        values.setdefault("lambda", lam)  # the step's weight: the schedule's, or lower where bounded
        state.add_step(values)
        plan.guard.observe(values["top1"], end, state.global_step)
        bar.set_postfix(
            {k: f"{v:.4g}" for k, v in state.means().items() if k not in ("top1", "lambda", "cgc_floored")},
            refresh=False,
        )
        if on_step is not None:
            on_step(values, stopping)
    if not state.steps:
        raise TrainingFailed(
            f"no batch of epoch {state.epoch + 1} had enough readable images; check the image "
            f"files (warnings above name the unreadable ones)"
        )
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
            for k, c in metrics.topk_correct(logits_of(model(x)), y).items():
                counts[f"top{k}"] += c
            counts["n"] += y.shape[0]
    counts = ctx.sum_values(counts)
    if not counts["n"]:
        raise TrainingFailed("no val image could be read (the warnings above name them)")
    return {"val_top1": 100 * counts["top1"] / counts["n"], "val_top5": 100 * counts["top5"] / counts["n"]}
