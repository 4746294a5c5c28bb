"""``python -m cgc.train``: train a classifier with the CGC term (or the CE / MSE baselines).

The recipe, as a list of factories: the config (:mod:`cgc.train_config`: flags, ``--config FILE``,
validated before anything is built) -> :func:`build_data` -> :func:`build_model` ->
:func:`build_optimizer` -> :func:`build_term` -> :func:`fit` (epochs of
:func:`cgc.engine.train_one_epoch` and :func:`cgc.engine.validate`, checkpoints by
:class:`cgc.checkpoint.CheckpointSaver`) -> :func:`final_results` (accuracy and explanation
metrics) -> :func:`write_results` (pictures, ``metrics.json``) and ``model.safetensors`` -> the
results table.

One process, or one per GPU / CPU worker under ``torchrun`` (DistributedDataParallel,
:mod:`cgc.distributed`): ``--batch-size`` is the global batch, global batch ``k`` holds the
same images for any number of processes, and the InfoNCE negatives are the whole global batch,
so a recipe trains the same model on 1 or N processes. Every run writes ``OUT/config.yaml`` at
its start (``--config`` on it reruns the run); every epoch a JSONL log line and atomic
checkpoints, with ``--checkpoint-every`` in the middle of epochs too; SIGTERM saves and stops;
a restarted torchrun worker resumes by itself. Only the first process writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path

import torch

from . import cli, data, distributed, files, metrics, models, runtime, tables, viz
from .cam import CAM
from .checkpoint import WEIGHTS_FILE, CheckpointSaver
from .engine import EpochPlan, StepOptions, batches, train_one_epoch, validate
from .errors import ConfigError, Preempted
from .gate import TermOutcome
from .models import from_huggingface
from .optimization import build_optimizer
from .run_state import RunState
from .runlog import RunLog
from .safeguards import Safeguards
from .structure import to_channels_last
from .term import CGCTerm
from .train_config import TrainConfig, expected_world_size, parse

log = logging.getLogger("cgc.train")


# ----------------------------------------------------------------------------- the factories
@dataclasses.dataclass
class TrainData:
    """The run's data: the dataset's splits and classes (``bundle``), the unlabeled images of
    the semi-supervised recipe (or None), and how many optimizer steps make an epoch."""

    bundle: data.DataBundle
    unlabeled: torch.utils.data.Dataset | None
    unlabeled_in_memory: bool
    steps_per_epoch: int

    @property
    def may_drop(self) -> bool:
        """Whether a batch can lose images (unreadable files)."""
        return not self.bundle.in_memory or (self.unlabeled is not None and not self.unlabeled_in_memory)


def build_data(config: TrainConfig, ctx: distributed.Context, out: Path) -> TrainData:
    """The dataset of ``config``, its limited-data subset (listed in ``OUT/train_files.txt``)
    and its unlabeled stream."""
    section, seed = config.data, config.run.seed
    bundle = data.build_from(section, seed=seed)
    from_training_set = section.unlabeled in ("rest", "all")
    unlabeled = (
        data.unlabeled_images(section.unlabeled, bundle.image_size, strict=section.strict)
        if section.unlabeled is not None and not from_training_set
        else None
    )
    full = bundle.train
    if section.limited:
        bundle.train = data.limit(full, per_class=section.samples_per_class, fraction=section.train_fraction, seed=seed)
        if section.unlabeled == "rest":
            rest = sorted(set(range(len(full))) - set(bundle.train.indices))
            unlabeled = data.WithoutLabels(data.take(full, rest))
        if ctx.primary:
            data.write_file_list(out / "train_files.txt", bundle.train)
    if section.unlabeled == "all":
        unlabeled = data.WithoutLabels(full)
    batch = config.optim.batch_size
    steps = len(bundle.train) // batch
    if not steps:
        raise ConfigError(f"--batch-size {batch} is larger than the {len(bundle.train)} training images")
    return TrainData(bundle, unlabeled, from_training_set and bundle.in_memory, steps)


def build_model(config: TrainConfig, train_data: TrainData, device: torch.device) -> torch.nn.Module:
    """The classifier of ``config`` with a head for the dataset's classes, built for the
    dataset's image size (transformers: their patch grid and position embeddings), on
    ``device`` (its 4-D weights channels-last on CPUs: :func:`cgc.runtime.channels_last`)."""
    bundle = train_data.bundle
    model = models.build_from(config.model, len(bundle.classes), image_size=bundle.image_size).to(device)
    if runtime.channels_last(device):
        to_channels_last(model)
    return model


def distribute(model, ctx: distributed.Context, *, sync_bn: bool):
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the processes;
    with ``sync_bn`` its BatchNorms made SyncBatchNorm), or as it is for one process."""
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not ctx.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None
    )


def build_term(config: TrainConfig, model, ctx: distributed.Context) -> tuple[CAM, torch.nn.Module, CGCTerm | None]:
    """``(cam, net, term)``: the explanations of ``model`` (at ``--target-layer`` with
    ``--cam``), the network the steps run (DDP-wrapped under torchrun) and the CGC term on it
    (None for ``--loss ce``), whose InfoNCE negatives are gathered from every process with
    ``--negatives global``."""
    channels_last = runtime.channels_last(ctx.device)
    term_config, backend = config.term, config.run.backend
    cam = CAM(model, term_config.target_layer, method=term_config.cam, backend=backend, channels_last=channels_last)
    net = distribute(model, ctx, sync_bn=config.distributed.sync_bn)
    if not term_config.enabled:
        return cam, net, None
    prefix = "module." if net is not model else ""
    gather = ctx.gather if config.distributed.negatives == "global" and ctx.distributed else None
    term = CGCTerm.from_config(
        net,
        term_config,
        target_layer=prefix + cam.target_layer,
        gather=gather,
        backend=backend,
        channels_last=channels_last,
    )
    return cam, net, term


def resume_source(resume: str | None, out: Path) -> Path | None:
    """The checkpoint to continue from: ``OUT/last.pt`` in a restarted torchrun worker or with
    ``--resume auto`` (when it exists), else ``--resume``."""
    last = out / "last.pt"
    if distributed.restarted() and last.is_file():
        return last
    if resume == "auto":
        return last if last.is_file() else None
    return Path(resume) if resume else None


# ----------------------------------------------------------------------------- the epochs
def build_plan(
    config: TrainConfig, opt: torch.optim.Optimizer, train_data: TrainData, ctx: distributed.Context, amp: str
) -> EpochPlan:
    """What every epoch's steps share: the learning-rate schedule, the step options (the CE
    view's crops, precision, backend, memory format), the term's safeguards (its weight, gate,
    targets and crops), the loader's habits."""
    options = StepOptions(
        config.run.seed, config.data.ce_crop_scale, amp, config.run.backend, runtime.channels_last(ctx.device)
    )
    gathered = config.distributed.negatives == "global" and ctx.distributed
    return EpochPlan(
        opt,
        config.optim.schedule_of(),
        options,
        Safeguards(config.term),
        ctx,
        train_data.steps_per_epoch,
        min_images=2 if config.term.loss == "cgc" and not gathered else 1,
        may_drop=train_data.may_drop,
    )


def epoch_batches(config: TrainConfig, train_data: TrainData, ctx: distributed.Context, epoch: int, start: int):
    """``(loader, unlabeled)``: this process's share of epoch ``epoch``'s global batches from
    step ``start`` on, and the unlabeled stream at the same position (None without one)."""
    bundle, steps_per_epoch = train_data.bundle, train_data.steps_per_epoch
    data.set_epoch(bundle.train, epoch, config.run.seed)
    sampler = distributed.GlobalBatchSampler(
        len(bundle.train),
        config.optim.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=config.run.seed,
        epoch=epoch,
        start=start,
    )
    loader = batches(bundle.train, sampler, runtime.loader_workers(config.data.workers, bundle.in_memory))
    if train_data.unlabeled is None:
        return loader, None
    u_sampler = data.CyclingBatchSampler(
        len(train_data.unlabeled),
        config.run.seed + 1,
        config.data.unlabeled_batch_size or config.optim.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        start=epoch * steps_per_epoch + start,
    )
    u_workers = runtime.loader_workers(config.data.workers, train_data.unlabeled_in_memory)
    return loader, iter(batches(train_data.unlabeled, u_sampler, u_workers))


def fit(
    config: TrainConfig,
    net,
    term: CGCTerm | None,
    plan: EpochPlan,
    train_data: TrainData,
    saver: CheckpointSaver,
    state: RunState,
    runlog: RunLog | None,
) -> RunState:
    """Train from ``state`` to the last epoch: each epoch's steps, its validation (every
    ``--val-every`` epochs and after the last), its log line and checkpoints. SIGTERM (or a
    stop asked by any process) saves ``last.pt`` after the current step and raises
    :class:`cgc.errors.Preempted`."""
    ctx, opt, bundle = plan.ctx, plan.opt, train_data.bundle
    val_sampler = distributed.GlobalBatchSampler(
        len(bundle.val),
        config.optim.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        shuffle=False,
        drop_last=False,
    )
    val_loader = batches(bundle.val, val_sampler, runtime.loader_workers(config.data.workers, bundle.in_memory))
    model = net.module if ctx.distributed else net
    with runtime.stop_on_sigterm() as sigterm:

        def on_step(values: dict[str, float], stopping: bool) -> None:
            if runlog is not None:
                runlog.step(state.global_step, {"epoch": state.epoch + 1, "lr": opt.param_groups[0]["lr"], **values})
            if stopping:
                saver.save(state)
                raise Preempted(
                    f"saved {saver.last} at epoch {state.epoch + 1}, step {state.step}; continue with "
                    f"--resume {saver.out} (restarted torchrun workers resume by themselves)"
                )
            saver.after_step(state, plan.steps_per_epoch)

        for epoch in range(state.epoch, config.optim.epochs):
            loader, unlabeled = epoch_batches(config, train_data, ctx, epoch, state.step)
            t0 = time.time()
            train_one_epoch(
                net,
                term,
                plan,
                loader,
                state,
                unlabeled=unlabeled,
                stop=lambda: sigterm["stop"],
                on_step=on_step,
                desc=f"epoch {epoch + 1}/{config.optim.epochs}",
            )
            record = epoch_record(state, opt, time.time() - t0, files=not bundle.in_memory)
            if (epoch + 1) % config.run.val_every == 0 or epoch + 1 == config.optim.epochs:
                record.update(validate(model, val_loader, ctx.device, ctx, plan.options.amp))
            saver.end_epoch(state, record)
            if runlog is not None:
                runlog.epoch(record, state.global_step)
                val = (
                    f", val top-1 {record['val_top1']:.2f} %, top-5 {record['val_top5']:.2f} %"
                    if "val_top1" in record
                    else ""
                )
                log.info(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}{val} ({record['time_s']:.0f} s)")
    return state


def epoch_record(state: RunState, opt, seconds: float, *, files: bool) -> dict:
    """The log line of the epoch that ``state`` is closing: learning rate, time, the means
    of its step losses, train top-1 (%), and for file datasets the unreadable images skipped."""
    record = {"epoch": state.epoch + 1, "lr": opt.param_groups[0]["lr"], "time_s": round(seconds, 2)}
    record.update({f"train_{k}": v for k, v in state.means().items()})
    record["train_top1"] *= 100
    if files:
        record["train_skipped"] = state.skipped
    if state.skipped:
        warnings.warn(
            f"epoch {state.epoch + 1}: skipped {state.skipped} unreadable images (named in the warnings "
            f"above; --strict stops at the first)",
            stacklevel=2,
        )
    return record


# ----------------------------------------------------------------------------- the end
def final_results(
    config: TrainConfig,
    cam: CAM,
    bundle: data.DataBundle,
    state: RunState,
    ctx: distributed.Context,
    term: TermOutcome | None = None,
    **facts,
) -> dict:
    """The run's results: last and best validation accuracy, the explanation metrics of
    :data:`cgc.metrics.TRAINING_METRICS` (the evaluation protocol's crops, 8-100 % of the image,
    whatever ``--crop-scale`` trained with: comparable across recipes), whether and from which
    step the CGC ``term`` ran (None: the CE baseline) and the run's ``facts`` (precision, wall
    time)."""
    results = {k: state.history[-1][k] for k in ("val_top1", "val_top5")}
    results["best_val_top1"] = state.best
    chosen = metrics.select(list(metrics.TRAINING_METRICS), has_boxes=hasattr(bundle.val, "boxes"))
    results.update(
        metrics.explanation_metrics(
            cam,
            bundle.val,
            ctx.device,
            metrics=chosen,
            settings=metrics.MetricsConfig(),
            job=ctx,
        )
    )
    results.update(
        loss=config.term.loss,
        arch=config.model.arch,
        dataset=config.data.dataset,
        epochs=config.optim.epochs,
        processes=ctx.world_size,
    )
    if term is not None:
        results.update(term.to_dict(), term_summary=term.summary())
        if term.warning():
            results["term_warning"] = term.warning()
    return results | facts


def write_results(
    config: TrainConfig,
    cam: CAM,
    bundle: data.DataBundle,
    state: RunState,
    runlog: RunLog | None,
    results: dict,
    device: torch.device,
) -> None:
    """``overlays.png`` (heatmaps of validation images with their boxes), ``curves.png`` (losses
    and accuracy per epoch) and ``metrics.json`` in the run folder (the first process calls it)."""
    out, history = Path(config.run.out), state.history
    if hasattr(bundle.val, "boxes") and config.run.overlays:
        viz.save_overlays(
            out / "overlays.png",
            [cam],
            [f"{config.term.cam} (predicted class)"],
            bundle.val,
            device,
            config.run.overlays,
            bundle.classes,
        )
        if runlog is not None:
            runlog.image("overlays", out / "overlays.png", state.global_step)
    losses = ("train_loss", "train_ce", "train_cgc", "train_cgc_unlabeled")
    viz.plot_curves(
        out / "curves.png",
        {
            "training loss": {
                k.removeprefix("train_"): [(r["epoch"], r[k]) for r in history if k in r]
                for k in losses
                if any(k in r for r in history)
            },
            "accuracy (%)": {k: [(r["epoch"], r[k]) for r in history if k in r] for k in ("train_top1", "val_top1")},
        },
    )
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")


def results_table(results: dict) -> str:
    """The run's final numbers as a Markdown table: each number, which way is better, what it is."""
    rows = [
        ("val top-1 (%) ↑", results["val_top1"], ".2f", "accuracy on the validation images, last epoch"),
        ("val top-5 (%) ↑", results["val_top5"], ".2f", "the label among the 5 highest scores"),
        ("best val top-1 (%) ↑", results["best_val_top1"], ".2f", "best epoch (best.pt)"),
    ]
    for name in metrics.TRAINING_METRICS:
        if name in results:
            m = metrics.METRICS[name]
            rows.append((m.label + m().arrow, results[name], m.fmt, m.about))
    rows.append(("wall time (s)", results["wall_time_s"], ".0f", f"{results['processes']} process(es)"))
    cells = [(label, None if v is None else format(v, fmt), about) for label, v, fmt, about in rows]
    if "term_summary" in results:
        cells.insert(3, ("CGC term ran", results["term_summary"], "the first step whose loss held the term"))
    return tables.markdown(["", "value", "what it is"], cells, "lrl") + "\n↑ higher is better, ↓ lower is better"


# ----------------------------------------------------------------------------- the command
def run(config: TrainConfig, ctx: distributed.Context | None = None) -> dict:
    """Train and explain one run of ``config`` (validated here too) and write it to
    ``config.run.out``: ``config.yaml``, the logs, checkpoints, ``model.safetensors``, the metrics
    and the pictures (the first process writes). Returns the results of :func:`final_results`."""
    started = time.time()
    ctx = ctx or distributed.Context(distributed.pick_device(config.run.device))
    config.validate(world_size=ctx.world_size, device_type=ctx.device.type)
    amp = runtime.resolve_amp(config.run.amp, ctx.device)
    out = Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.primary:
        files.write_text_atomic(config.to_yaml(), out / "config.yaml")
    runtime.seed_everything(config.run.seed)
    with contextlib.ExitStack() as stack:
        train_data = build_data(config, ctx, out)
        model = build_model(config, train_data, ctx.device)
        opt = build_optimizer(model, config.optim, models.head_names(model))
        bundle = train_data.bundle
        info = {"classes": bundle.classes, "image_size": bundle.image_size, "cam": config.term.cam}
        if from_huggingface.is_model(model):  # the checkpoints rebuild it without its source
            info["hf_config"] = from_huggingface.config_json(model)
        cam, net, term = build_term(config, model, ctx)
        stack.callback(cam.close)
        if term is not None:
            stack.callback(term.close)
        info["target_layer"] = cam.target_layer
        saver = CheckpointSaver(out, config, model, opt, ctx, info=info, every=config.run.checkpoint_every)
        source = resume_source(config.run.resume, out)
        plan = build_plan(config, opt, train_data, ctx, amp)
        state = saver.resume(source)
        if state is None:
            state = RunState(best_metric=saver.metric, gate=plan.guard.state)
        else:
            plan.guard.state = state.gate
            where = f"epoch {state.epoch}, step {state.step}" if state.step else f"the end of epoch {state.epoch}"
            log.info(f"resumed from {source} at {where}")
        announce(config, train_data, ctx, amp, cam.target_layer)
        runlog = None
        if ctx.primary:
            runlog = stack.enter_context(
                RunLog(out, history=state.history, global_step=state.global_step, tensorboard=config.run.tensorboard)
            )
        fit(config, net, term, plan, train_data, saver, state, runlog)
        outcome = plan.guard.outcome(state.global_step)
        results = final_results(
            config, cam, bundle, state, ctx, outcome, amp=amp, wall_time_s=round(time.time() - started, 1)
        )
        if ctx.primary:
            write_results(config, cam, bundle, state, runlog, results, ctx.device)
        saver.save_weights()
    if ctx.primary:
        log.info(
            f"wrote {out}/: metrics.json, log.jsonl, steps.jsonl, last.pt, best.pt, {WEIGHTS_FILE}, "
            + (f"{from_huggingface.FOLDER}/, " if from_huggingface.is_model(model) else "")
            + "overlays.png, curves.png, config.yaml"
        )
    return results


def announce(config: TrainConfig, train_data: TrainData, ctx: distributed.Context, amp: str, layer: str) -> None:
    """One line at the start: what trains on what, where, in which precision."""
    if not ctx.primary:
        return
    bundle = train_data.bundle
    procs = f", {ctx.world_size} processes (global batch {config.optim.batch_size})" if ctx.distributed else ""
    precision = "bfloat16 autocast" if amp == "bf16" else "float32"
    if config.run.amp == "auto":
        precision += (
            " (--amp auto: this device has fast bfloat16)" if amp == "bf16" else " (--amp auto: no fast bfloat16 here)"
        )
    unlabeled = f", {len(train_data.unlabeled)} unlabeled images" if train_data.unlabeled is not None else ""
    gate = (
        f" (the term once training top-1 reaches {config.term.term_gate:g})"
        if config.term.loss != "ce" and config.term.term_gate
        else ""
    )
    log.info(
        f"cgc.train: {config.model.arch} on {config.data.dataset} ({len(bundle.train)} train / {len(bundle.val)} val, "
        f"{len(bundle.classes)} classes, {bundle.image_size}px), loss={config.term.loss}{gate}, device={ctx.device}{procs}, "
        f"{precision}, {config.term.cam} at '{layer}'{unlabeled}"
    )


def main(argv: list[str] | None = None) -> dict:
    """``python -m cgc.train``: the config of the command line, validated before anything is
    built, then :func:`run` in this process's place of the job; a library error ends the process
    with one ``error: ...`` line, the results table goes to stdout."""
    with cli.exit_on_error():
        config = parse(argv)
        config.validate(world_size=expected_world_size(), device_type=distributed.device_type(config.run.device))
        cli.setup_logging()

        def command(ctx: distributed.Context) -> dict:
            results = run(config, ctx)
            if ctx.primary:
                print(results_table(results))
                if "term_warning" in results:  # the last line a user sees
                    log.warning(f"warning: {results['term_warning']}")
            return results

        return cli.run_in_job(command, config.run.device, strict=config.run.deterministic)


if __name__ == "__main__":
    main()
