"""A run's checkpoints: their format, the one class that writes and restores them
(:class:`CheckpointSaver`), and the models they hold (:func:`load_model`).

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (format
:data:`FORMAT`): the model and optimizer state, the run's config (:class:`TrainConfig`, one
mapping per section), where the run stands (:class:`cgc.run_state.RunState`: epoch, step,
running sums, the best value of the ranking metric, history, the term's gate), every process's
RNG state, and what explaining the model needs (classes, image size, CAM layer and method).
Files are written atomically and loaded with ``torch.load(weights_only=True)``
(:mod:`cgc.files`). :func:`load` brings checkpoints of earlier formats to the current one
(:func:`migrate`), so a run saved before a format change resumes and evaluates as before.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from pathlib import Path

from torch import nn

from . import files, models
from .errors import BadFile, ConfigError, UnsupportedModel
from .gate import GateState, TermOutcome
from .models import from_huggingface
from .run_state import RunState
from .runtime import rng_state, set_rng_state
from .train_config import TrainConfig

#: the checkpoint format written now; :func:`migrate` reads every earlier one
FORMAT = 4
#: settings added to the config (or whose default changed) after checkpoints were first written,
#: with the value a run trained with before: a checkpoint whose config lacks one predates it
PREDATED = {
    "optimizer": "sgd",
    "term_gate": 0.0,
    "cam_target": "predicted",
    "detach_target": False,
    "heatmap_floor": 0.0,
}
#: the plain weights every run leaves next to its checkpoints (loadable without cgc)
WEIGHTS_FILE = "model.safetensors"


def config_of(ckpt: dict) -> TrainConfig:
    """The config of a checkpoint loaded by :func:`load`."""
    return TrainConfig.from_dict(ckpt["config"], source="checkpoint")


def term_outcome(ckpt: dict) -> TermOutcome | None:
    """Whether the CGC term of the run that saved ``ckpt`` (loaded by :func:`load`) ran; None
    for the CE baseline."""
    term = config_of(ckpt).term
    if not term.enabled or "state" not in ckpt:
        return None
    state = RunState.from_dict(ckpt["state"])
    gate = state.gate
    return TermOutcome(gate.first_step, state.global_step, gate.top1, term.term_gate, gate.on_at)


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
    value of the metric ``best_metric`` that ranks checkpoints (None before any), the config as
    one flat mapping, and the term's gate as ``term_on_at`` / ``train_top1_average`` /
    ``term_first_step``. Format 4 stores the config by sections and the gate as ``state["gate"]``
    (:class:`cgc.gate.GateState`). A config without a setting of :data:`PREDATED` gets the value
    the run trained with, not today's default.
    """
    version = ckpt.get("format", 1)
    if version > FORMAT:
        raise BadFile(f"{source} was written by a newer cgc (checkpoint format {version}, this one reads <= {FORMAT})")
    if version == 1:
        ckpt = _from_format_1(ckpt, source)
    if ckpt["format"] == 2:
        ckpt = _from_format_2(ckpt)
    if ckpt["format"] == 3:
        ckpt = _from_format_3(ckpt, source)
    return ckpt


def _from_format_1(ckpt: dict, source: str) -> dict:
    args = {**PREDATED, **ckpt.get("args", {})}
    weighting = args.pop("cam_weighting", None)
    if not args.get("cam"):
        args["cam"] = {"elementwise": "hirescam"}.get(weighting, "gradcam")
    if isinstance(args.get("classes"), str):
        args["classes"] = args["classes"].split(",")
    config = TrainConfig.from_dict(_known(args), source=source).flat()
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


def _known(flat: dict) -> dict:
    """The values of a flat config that name a setting today (or by a name it had before)."""
    return {k: v for k, v in flat.items() if k in TrainConfig.leaves() or TrainConfig.alias_of(k)}


def _from_format_2(ckpt: dict) -> dict:
    ckpt = dict(ckpt)
    state = dict(ckpt.pop("progress"))
    best = state.pop("best_top1", -1.0)
    state.update(best=None if best < 0 else best, best_metric="val_top1")
    return {**ckpt, "format": 3, "state": state}


def _from_format_3(ckpt: dict, source: str) -> dict:
    flat = {**PREDATED, **ckpt["config"]}
    config = TrainConfig.from_dict(_known(flat), source=source)
    state = dict(ckpt["state"])
    on_at = state.pop("term_on_at", None if config.term.term_gate > 0 else 0.0)
    top1, first = state.pop("train_top1_average", None), state.pop("term_first_step", None)
    state["gate"] = dataclasses.asdict(GateState(on_at, first, top1))
    return {**ckpt, "format": 4, "config": config.to_dict(), "state": state}


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
        config: TrainConfig,
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
        if from_huggingface.is_model(self.model):
            from_huggingface.save_folder(self.model, self.out / from_huggingface.FOLDER, self.info["classes"])
        return path

    def resume(self, source: Path | None) -> RunState | None:
        """Restore model, optimizer and this process's RNG from ``source`` and return where the
        run stood (None when ``source`` is None: a new run)."""
        if source is None:
            return None
        ckpt = load(source)
        mine, theirs = self.config, config_of(ckpt)
        if (theirs.model.arch, theirs.data.dataset) != (mine.model.arch, mine.data.dataset):
            raise BadFile(
                f"{source} is a {theirs.model.arch} on {theirs.data.dataset}, not a {mine.model.arch} on "
                f"{mine.data.dataset}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])
        state = RunState.from_dict(ckpt["state"])
        if state.best_metric != self.metric:  # ranked by another metric before: start the ranking anew
            state.best, state.best_metric = None, self.metric
        return state


# ----------------------------------------------------------------------------- the models they hold
@dataclasses.dataclass
class LoadedModel:
    """A model ready to explain: its class names, input size, CAM layer (None: find it), the
    CAM method it was trained with, its architecture and where it came from (for reports); for a
    cgc checkpoint its
    run's ``config`` (whose classes must be the evaluation data's) and what it says of its term
    (``term``: None for the CE baseline); None for other models."""

    model: nn.Module
    classes: list[str]
    image_size: int
    target_layer: str | None
    method: str
    arch: str
    source: str
    config: TrainConfig | None = None
    term: TermOutcome | None = None

    @property
    def from_checkpoint(self) -> bool:
        return self.config is not None


def load_model(
    *,
    checkpoint_path: str | Path | None = None,
    arch: str | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """A cgc checkpoint's model (its classes, image size, CAM layer and method; a transformer is
    rebuilt for the image size stored with it, a Hugging Face model from the config stored with
    it), or ``arch`` with its local ``weights`` or the library's ``pretrained`` ones
    (:func:`cgc.models.load_arch`)."""
    if checkpoint_path:
        return _from_checkpoint(checkpoint_path)
    model, classes, size = models.load_arch(
        arch, weights=weights, pretrained=pretrained, num_classes=num_classes, image_size=image_size
    )
    return LoadedModel(model, classes, size, None, "gradcam", arch, str(weights or f"{arch} (pretrained)"))


def _from_checkpoint(path: str | Path) -> LoadedModel:
    """The model of the cgc checkpoint ``path`` with what the checkpoint says of it."""
    ckpt = load(path)
    config = config_of(ckpt)
    num = len(ckpt.get("classes") or []) or config.data.num_classes
    classes = list(ckpt.get("classes") or [f"class {i}" for i in range(num)])
    size = ckpt["image_size"]
    if ckpt.get("hf_config"):  # rebuilt offline, as it trained, whatever became of its source
        hf = from_huggingface.new_model(from_huggingface.config_from_json(ckpt["hf_config"]))
        model = models.replace_head(hf, num)
    else:
        model_config = config.model.replace(pretrained=False, weights=None, new_head=False)
        model = models.build_from(model_config, num, image_size=size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UnsupportedModel(
            f"the weights in {path} do not fit {config.model.arch}: {str(err).splitlines()[0]}"
        ) from err
    target_layer, method, arch = ckpt.get("target_layer"), ckpt["cam"], config.model.arch
    return LoadedModel(model, classes, size, target_layer, method, arch, str(path), config, term_outcome(ckpt))
