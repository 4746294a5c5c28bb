"""A run's checkpoints: their format, and the one class that writes and restores them,
:class:`CheckpointSaver`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (format
:data:`FORMAT`): the model and optimizer state, the run's config, where the run stands
(:class:`cgc.engine.RunState`: epoch, step, running sums, the best value of the ranking metric,
history), every process's RNG state, and what explaining the model needs (classes, image size,
CAM layer and method). Files are written atomically and loaded with
``torch.load(weights_only=True)`` (:mod:`cgc.files`). :func:`load` brings checkpoints of
earlier formats to the current one (:func:`migrate`), so a run saved before a format change
resumes and evaluates as before.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from pathlib import Path

from . import files, huggingface
from .engine import RunState
from .errors import BadFile, ConfigError
from .runtime import rng_state, set_rng_state
from .schedule import TermGate, TermOutcome

#: the checkpoint format written now; :func:`migrate` reads every earlier one
FORMAT = 3
#: settings added to the config (or whose default changed) after checkpoints were first written,
#: with the value a run trained with before: a checkpoint whose config lacks one predates it
PREDATED = {"optimizer": "sgd", "term_gate": 0.0, "cam_target": "predicted", "detach_target": False}
#: the plain weights every run leaves next to its checkpoints (loadable without cgc)
WEIGHTS_FILE = "model.safetensors"


def term_outcome(state: dict | None, config: dict) -> TermOutcome | None:
    """Whether the CGC term of the run that saved a checkpoint ran (its ``state`` and
    ``config``, migrated); None for the CE baseline or without a run state."""
    if state is None or config.get("loss") == "ce":
        return None
    return RunState(**state).term_outcome(TermGate(config.get("term_gate", PREDATED["term_gate"])))


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint in the current format (:func:`migrate`), loaded safely
    (``weights_only=True``); a run folder means its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    ckpt = files.safe_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise BadFile(f"{path} is not a cgc checkpoint (no 'model' entry)")
    return migrate(ckpt, source=str(path))


def migrate(ckpt: dict, *, source: str = "checkpoint") -> dict:
    """``ckpt`` in format :data:`FORMAT`, from any earlier format, one step at a time.

    Format 1 (no ``format`` key) stored the command line's namespace as ``args`` (with
    ``cam_weighting`` before the CAM methods had names: ``elementwise`` is HiResCAM, ``pooled``
    Grad-CAM), one RNG state when it ran in one process, and the mid-epoch position as
    ``epoch_state``. Format 2 stored the config as ``config`` (:class:`cgc.config.TrainConfig`
    values), the CAM method as ``cam``, the RNG states as a list, and the position as
    ``progress`` with the best validation top-1 as ``best_top1`` (-1 before any). Format 3
    stores the position as ``state`` (:class:`cgc.engine.RunState`), whose ``best`` is the best
    value of the metric ``best_metric`` that ranks checkpoints (None before any). A config
    without a setting of :data:`PREDATED` gets the value the run trained with, not today's
    default.
    """
    version = ckpt.get("format", 1)
    if version > FORMAT:
        raise BadFile(f"{source} was written by a newer cgc (checkpoint format {version}, this one reads <= {FORMAT})")
    if version == 1:
        ckpt = _from_format_1(ckpt, source)
    if ckpt["format"] == 2:
        ckpt = _from_format_2(ckpt)
    if isinstance(ckpt.get("config"), dict):
        ckpt = {**ckpt, "config": {**PREDATED, **ckpt["config"]}}
    return ckpt


def _from_format_1(ckpt: dict, source: str) -> dict:
    from .config import TrainConfig

    args = {**PREDATED, **ckpt.get("args", {})}
    weighting = args.pop("cam_weighting", None)
    if not args.get("cam"):
        args["cam"] = {"elementwise": "hirescam"}.get(weighting, "gradcam")
    if isinstance(args.get("classes"), str):
        args["classes"] = args["classes"].split(",")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.from_dict({k: v for k, v in args.items() if k in known}, source=source).to_dict()
    within = ckpt.get("epoch_state", {})
    rng = ckpt.get("rng")
    return {
        "format": 2,
        "model": ckpt["model"],
        "optimizer": ckpt.get("optimizer"),
        "config": config,
        "classes": ckpt.get("classes"),
        "image_size": ckpt.get("image_size") or config.get("image_size") or 224,
        "target_layer": ckpt.get("target_layer"),
        "cam": config["cam"],
        "rng": rng if isinstance(rng, list) or rng is None else [rng],
        "progress": {
            "epoch": ckpt.get("epoch", 0),
            "step": within.get("step", 0),
            "sums": dict(within.get("sums", {})),
            "steps": within.get("steps", 0),
            "skipped": within.get("skipped", 0),
            "global_step": ckpt.get("global_step", 0),
            "best_top1": ckpt.get("best_top1", -1.0),
            "history": list(ckpt.get("history", [])),
        },
    }


def _from_format_2(ckpt: dict) -> dict:
    ckpt = dict(ckpt)
    state = dict(ckpt.pop("progress"))
    best = state.pop("best_top1", -1.0)
    state.update(best=None if best < 0 else best, best_metric="val_top1")
    return {**ckpt, "format": 3, "state": state}


class CheckpointSaver:
    """The checkpoints of one run folder ``out``: ``last.pt`` (every epoch end, every
    ``every`` steps in the middle of epochs, and when the run is preempted), ``best.pt`` (the
    epoch with the best value of ``metric`` in its log record, ``mode`` ``max`` or ``min``)
    and, at the end, :data:`WEIGHTS_FILE` (the plain weights). Every process calls
    :meth:`save` (it gathers every process's RNG state); the first writes. ``info`` (classes,
    image size, CAM layer and method) goes into every file.
    """

    def __init__(
        self,
        out: str | Path,
        config,
        model,
        optimizer,
        ctx,
        *,
        info: dict,
        every: int = 0,
        metric: str = "val_top1",
        mode: str = "max",
    ):
        if mode not in ("max", "min"):
            raise ConfigError(f"a checkpoint metric is ranked by 'max' or 'min', got {mode!r}")
        self.out = Path(out)
        self.config, self.model, self.optimizer, self.ctx = config, model, optimizer, ctx
        self.info, self.every = dict(info), every
        self.metric, self.mode = metric, mode

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def save(self, state: RunState, name: str = "last.pt") -> None:
        """A checkpoint of the run at ``state`` as ``OUT/name``."""
        rngs = self.ctx.all_gather_object(rng_state())
        if not self.ctx.primary:
            return
        payload = {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            **self.info,
            "rng": rngs,
            "state": state.to_dict(),
        }
        files.save_atomic(payload, self.out / name)

    def improves(self, value: float | None, best: float | None) -> bool:
        """Whether ``value`` of the ranking metric beats ``best`` (None: nothing to compare)."""
        better = operator.gt if self.mode == "max" else operator.lt
        return value is not None and (best is None or better(value, best))

    def end_epoch(self, state: RunState, record: dict) -> None:
        """Close the epoch in ``state`` with its log ``record`` and write ``last.pt`` (and
        ``best.pt`` when the record's ranking metric is the best so far)."""
        improved = self.improves(record.get(self.metric), state.best)
        if improved:
            state.best, state.best_metric = record[self.metric], self.metric
        state.end_epoch(record)
        self.save(state)
        if improved:
            self.save(state, "best.pt")

    def after_step(self, state: RunState, steps_per_epoch: int) -> None:
        """``last.pt`` every ``every`` steps, in the middle of epochs (epoch ends save anyway)."""
        if self.every and state.global_step % self.every == 0 and state.step < steps_per_epoch:
            self.save(state)

    def save_weights(self) -> Path | None:
        """The model's plain state dict as ``OUT/model.safetensors`` and, for a Hugging Face
        model, its ``save_pretrained`` folder ``OUT/hf_model`` naming the classes (first
        process)."""
        if not self.ctx.primary:
            return None
        path = self.out / WEIGHTS_FILE
        files.save_weights(self.model, path, metadata={k: json.dumps(v) for k, v in self.info.items()})
        if huggingface.is_model(self.model):
            huggingface.save_folder(self.model, self.out / huggingface.FOLDER, self.info["classes"])
        return path

    def resume(self, source: Path | None) -> RunState:
        """Restore model, optimizer and this process's RNG from ``source`` and return where the
        run stands (a fresh :class:`cgc.engine.RunState` when ``source`` is None)."""
        if source is None:
            return RunState(best_metric=self.metric)
        ckpt = load(source)
        mine, theirs = self.config, ckpt["config"]
        if theirs.get("arch") != mine.arch or theirs.get("dataset") != mine.dataset:
            raise BadFile(
                f"{source} is a {theirs.get('arch')} on {theirs.get('dataset')}, not a {mine.arch} on {mine.dataset}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])
        state = RunState(**ckpt["state"])
        if state.best_metric != self.metric:  # ranked by another metric before: start the ranking anew
            state.best, state.best_metric = None, self.metric
        return state
