"""One training step, one epoch and validation: the loop that :mod:`cgc.train` drives.

One step (the CGC recipe, batched): the loader gives the original view ``x``; on the device a
random crop/flip ``theta`` makes ``x_aug`` and an independent one makes ``x_ce`` (file datasets
give ``x_ce`` from the loader, cut from the decoded image); every image's crops and flips are
drawn from a key of (seed, epoch, its index), so they are the same in any batch and on any
number of processes. The three views go through the model in one batch with cross-entropy on
each; the CGC term (:class:`cgc.CGCTerm`) takes the CAMs of ``x`` and ``x_aug`` for the class
predicted on ``x`` (or the label, ``cam_target``) with ``create_graph=True`` and adds ``lambda *
CGC``. With unlabeled images the term comes from them instead (the semi-supervised recipe).
The term's weight follows the schedule from the step its gate opened (:class:`cgc.TermGate`:
cross-entropy first); until then the step is the CE baseline's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import data, distributed, metrics, transforms
from .errors import TrainingFailed
from .progress import progress as progress_bar
from .runtime import autocast
from .schedule import Schedule, TermGate, TermOutcome
from .structure import logits_of
from .term import CGCTerm, bounded_lambda


@dataclasses.dataclass
class RunState:
    """Where a run stands: the ``epoch`` in progress (or next to run) and its next ``step``, the
    sums over that epoch's steps of the losses (means over the global batch), how many steps ran
    and how many unreadable images were skipped; the optimizer steps taken in all
    (``global_step``), the best value so far of the metric that ranks checkpoints
    (``best_metric``; None before any), every finished epoch's log record, and the CGC term's
    gate (:class:`cgc.schedule.TermGate`): the position in epochs where the term was switched on
    (None: not yet), the first step (counted from 1) that ran it and the moving average of
    training top-1 that opens it. Saved in every checkpoint, so a run resumed in the middle of an
    epoch logs the same numbers."""

    epoch: int = 0
    step: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    counts: dict = dataclasses.field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    global_step: int = 0
    best: float | None = None
    best_metric: str = "val_top1"
    history: list = dataclasses.field(default_factory=list)
    term_on_at: float | None = 0.0
    train_top1_average: float | None = None
    term_first_step: int | None = None

    def add_step(self, values: dict[str, float]) -> None:
        """Count one optimizer step with its losses (global-batch means; a loss a step did not
        compute, the CGC term before its gate opened, is averaged over the steps that did)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.step += 1
        self.global_step += 1

    def means(self) -> dict[str, float]:
        """The epoch's step losses so far, each averaged over the steps that computed it."""
        return {k: v / self.counts.get(k, self.steps) for k, v in self.sums.items()}

    def end_epoch(self, record: dict) -> None:
        """Close the epoch with its log ``record``: the next one starts at its step 0."""
        self.history.append(record)
        self.epoch, self.step, self.sums, self.counts, self.steps, self.skipped = self.epoch + 1, 0, {}, {}, 0, 0

    def start_term(self, gate: TermGate) -> None:
        """A new run's gate: the term on from the first step, or off until the gate opens."""
        self.term_on_at = gate.first()
        self.term_first_step = 1 if self.term_on_at is not None else None

    def term_outcome(self, gate: TermGate) -> TermOutcome:
        """Whether the CGC term ran in this run, and from which step."""
        return TermOutcome(
            self.term_first_step, self.global_step, self.train_top1_average, gate.threshold, self.term_on_at
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How every step makes its views and runs them, besides the model and the schedule: the
    crops of the augmented (``crop_scale``, placed by ``crop_sampler``; also flipped vertically
    with ``vflip``) and CE (``ce_crop_scale``) views, keyed by ``seed``; mixed precision (a
    resolved ``amp``); the ops backend; channels-last input batches; the class the labeled
    images' CAMs explain (``cam_target``: ``predicted`` or ``label``); the bound on the term's
    gradient relative to cross-entropy's at the CAM layer (``grad_bound``, 0: none;
    :func:`cgc.bounded_lambda`)."""

    seed: int = 0
    crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE
    ce_crop_scale: tuple[float, float] = transforms.CE_SCALE
    amp: str = "off"
    backend: str | None = None
    channels_last: bool = False
    vflip: bool = False
    crop_sampler: str = "rrc"
    cam_target: str = "predicted"
    grad_bound: float = 0.0


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
    cam_target: str = "predicted",
    grad_bound: float = 0.0,
    all_reduce_sum=None,
) -> dict[str, torch.Tensor]:
    """Losses of one batch: CE on three views (``x_ce``, ``x`` and ``x_aug`` = ``x`` warped by
    ``theta``) plus ``lam`` * the CGC term (:class:`cgc.CGCTerm`; None: the CE baseline on the
    same views), all views in one forward pass.

    ``x_ce`` is cut from ``x`` by ``ce_theta`` on the device unless the loader gave it. With
    ``unlabeled`` images the CGC term is theirs (warped by ``unlabeled_theta``), the labeled
    views get only CE: the semi-supervised recipe. ``channels_last``: feed the CE baseline's
    batch in that memory format (the term's CAM does it for the CGC paths);
    ``image_padding``: what ``x_aug`` shows beyond ``x``'s borders where this function makes it
    (:func:`cgc.transforms.image_padding`; the term makes its own). ``cam_target``: the CAMs of
    labeled images explain the class ``predicted`` on ``x`` or their ``label``; unlabeled
    images' explain the predicted class. ``lam == 0`` skips the term (the CE baseline's
    step, with the same views and the same gradients). ``grad_bound`` > 0 lowers ``lam`` where
    the term's gradient at the CAM layer would exceed ``grad_bound`` times cross-entropy's
    (:func:`cgc.bounded_lambda`, norms summed over processes by ``all_reduce_sum``) and returns
    the weight it used as ``out["lambda"]``.
    """
    if x_ce is None:
        x_ce = transforms.apply(x, ce_theta, backend=backend)
    B = x.shape[0]
    out = {}
    if term is None or lam == 0:
        x_aug = transforms.apply(x, theta, padding_mode=image_padding, backend=backend)
        views = torch.cat([x, x_aug, x_ce])
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        logits = logits_of(model(views))
    elif unlabeled is None:
        cgc = term(x, theta=theta, extra=[x_ce], targets=y if cam_target == "label" else None)
        logits = torch.cat([cgc.logits, cgc.logits_aug, cgc.extra_logits[0]])
        out["cgc"] = cgc.loss
        out["cgc_floored"] = cgc.floored
    else:
        x_aug = transforms.apply(x, theta, padding_mode=image_padding, backend=backend)
        cgc = term(unlabeled, theta=unlabeled_theta, extra=[x, x_aug, x_ce])
        logits = torch.cat(cgc.extra_logits)
        out["cgc_unlabeled"] = cgc.loss
        out["cgc_floored"] = cgc.floored
    ce = sum(F.cross_entropy(logits[k * B : (k + 1) * B], y) for k in range(3))
    out["ce"] = ce
    term_loss = out.get("cgc", out.get("cgc_unlabeled"))
    if term_loss is not None and grad_bound > 0:
        lam = out["lambda"] = bounded_lambda(lam, ce, term_loss, cgc.activations, grad_bound, all_reduce_sum)
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
    options, this process's place in the job, the loader's habits (``may_drop``: batches
    can lose unreadable images; a step left with fewer than ``min_images`` on some process is
    skipped by all of them) and the CGC term's gate."""

    opt: torch.optim.Optimizer
    schedule: Schedule
    options: StepOptions
    ctx: distributed.Context
    steps_per_epoch: int
    min_images: int = 1
    may_drop: bool = False
    gate: TermGate = dataclasses.field(default_factory=TermGate)


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


def step_inputs(read, options: StepOptions, epoch: int, position: int, device) -> StepInputs:
    """A batch from :func:`read_batch` on ``device``, normalized, with its keyed crops: each
    image's from (seed, ``epoch``, its index), the unlabeled images' from (seed, the step's
    ``position`` in the run, their index)."""
    x, y, x_ce, idx, unlabeled, u_idx = read
    x, y = data.normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
    x_ce = data.normalize(x_ce.to(device, non_blocking=True)) if x_ce is not None else None
    size, keys = tuple(x.shape[-2:]), idx.tolist()
    seed, aug = options.seed, dict(vflip=options.vflip, sampler=options.crop_sampler)
    theta = crop_thetas(transforms.sample_keys(seed, epoch, keys, "aug"), size, options.crop_scale, device, **aug)
    ce_theta = None
    if x_ce is None:
        ce_theta = crop_thetas(transforms.sample_keys(seed, epoch, keys, "ce"), size, options.ce_crop_scale, device)
    inputs = StepInputs(x, y, theta, x_ce, ce_theta)
    if unlabeled is not None:
        inputs.unlabeled = data.normalize(unlabeled.to(device, non_blocking=True))
        u_keys = transforms.sample_keys(seed, position, u_idx.tolist(), "unlabeled")
        inputs.unlabeled_theta = crop_thetas(u_keys, size, options.crop_scale, device, **aug)
    return inputs


def optimize(model, term: CGCTerm | None, inputs: StepInputs, plan: EpochPlan, lam: float) -> dict[str, torch.Tensor]:
    """One optimizer step of :func:`train_step` on ``inputs``; its losses."""
    options = plan.options
    with autocast(plan.ctx.device, options.amp):
        losses = train_step(
            model,
            term,
            inputs.x,
            inputs.y,
            lam=lam,
            theta=inputs.theta,
            ce_theta=inputs.ce_theta,
            x_ce=inputs.x_ce,
            unlabeled=inputs.unlabeled,
            unlabeled_theta=inputs.unlabeled_theta,
            backend=options.backend,
            channels_last=options.channels_last,
            image_padding=transforms.image_padding(options.crop_sampler),
            cam_target=options.cam_target,
            grad_bound=options.grad_bound,
            all_reduce_sum=plan.ctx.all_reduce_sum if plan.ctx.distributed else None,
        )
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


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate: ``lr`` times the group's ``lr_scale`` (the head's --head-lr)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
        inputs = step_inputs(read, plan.options, epoch, epoch * steps_per_epoch + step, ctx.device)
        lam = schedule.lambda_at(epoch, step, steps_per_epoch, state.term_on_at)
        losses = optimize(model, term, inputs, plan, lam)
        values, stopping = reduce_losses(losses, stop(), ctx)
        if not math.isfinite(values["loss"]):
            raise TrainingFailed(
                f"the loss became {values['loss']} in epoch {epoch + 1}, step {step}; nothing was "
                f"saved for this epoch. Lower --lr or --lambda."
            )
        values.setdefault("lambda", lam)  # the step's weight: the schedule's, or lower where bounded
        was_off = state.term_on_at is None
        state.train_top1_average, state.term_on_at = plan.gate.observe(
            state.train_top1_average, values["top1"], state.term_on_at, epoch + (step + 1) / steps_per_epoch
        )
        if was_off and state.term_on_at is not None:
            state.term_first_step = state.global_step + 2  # this step is global_step + 1; the term runs from the next
        state.add_step(values)
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
