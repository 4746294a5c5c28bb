"""A run's checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``, and
owned by one class, :class:`CheckpointSaver`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (format
:data:`FORMAT`): the model and optimizer state, the run's config, where the run stands
(:class:`Progress`: epoch, step, running sums, history), every process's RNG state, and what
explaining the model needs (classes, image size, CAM layer). Files are written to a temporary
file in the same folder, flushed and renamed over the old one, so a crash mid-write leaves the
previous file intact. :func:`load` brings checkpoints of earlier formats to the current one
(:func:`migrate`), so a run saved before a format change resumes and evaluates as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import BadFile, MissingFile

#: the checkpoint format written now; :func:`migrate` reads every earlier one
FORMAT = 2
#: the plain weights every run leaves next to its checkpoints (loadable without cgc)
WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------------- files
def _write_atomic(path: str | Path, write: Callable) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and an atomic rename."""
    _write_atomic(path, lambda fh: torch.save(obj, fh))


def write_text_atomic(text: str, path: str | Path) -> None:
    """A text file written via a temporary file and an atomic rename."""
    _write_atomic(path, lambda fh: fh.write(text.encode()))


def safe_load(path: str | Path, what: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    A missing file is :class:`cgc.errors.MissingFile`; a corrupt one, or one that holds Python
    objects whose unpickling would run code (which ``weights_only`` refuses, rightly), is
    :class:`cgc.errors.BadFile` with a one-line reason instead of torch's page of advice.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        text = str(err)
        found = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
        if found:
            why = found[0].removeprefix("WeightsUnpickler error: ")
            raise BadFile(
                f"{what} {path} holds Python objects, not just tensors, and loading it could run "
                f"code ({why}); cgc loads only plain tensors: save a state_dict "
                f"(torch.save(model.state_dict(), path))"
            ) from err
        first = next((line.strip() for line in text.splitlines() if "error:" in line), None) or (
            text.strip().splitlines()[0] if text.strip() else type(err).__name__
        )
        raise BadFile(f"cannot read {what} {path}: corrupt, truncated or not a PyTorch file ({first})") from err


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint in the current format (:func:`migrate`), loaded safely
    (``weights_only=True``); a run folder means its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    ckpt = safe_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise BadFile(f"{path} is not a cgc checkpoint (no 'model' entry)")
    return migrate(ckpt, source=str(path))


def migrate(ckpt: dict, *, source: str = "checkpoint") -> dict:
    """``ckpt`` in format :data:`FORMAT`, from any earlier format.

    Format 1 (no ``format`` key) stored the command line's namespace as ``args`` (with
    ``cam_weighting`` before the CAM methods had names: ``elementwise`` is HiResCAM, ``pooled``
    Grad-CAM), one RNG state when it ran in one process, and the mid-epoch position as
    ``epoch_state``. Format 2 stores the config as ``config`` (:class:`cgc.config.TrainConfig`
    values), the CAM method as ``cam``, the RNG states as a list, and the position as
    ``progress``.
    """
    version = ckpt.get("format", 1)
    if version > FORMAT:
        raise BadFile(f"{source} was written by a newer cgc (checkpoint format {version}, this one reads <= {FORMAT})")
    if version == FORMAT:
        return ckpt
    from .config import TrainConfig

    args = dict(ckpt.get("args", {}))
    weighting = args.pop("cam_weighting", None)
    if not args.get("cam"):
        args["cam"] = {"elementwise": "hirescam"}.get(weighting, "gradcam")
    if isinstance(args.get("classes"), str):
        args["classes"] = args["classes"].split(",")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.from_dict({k: v for k, v in args.items() if k in known}, source=source).to_dict()
    state = ckpt.get("epoch_state", {})
    progress = Progress(
        epoch=ckpt.get("epoch", 0),
        step=state.get("step", 0),
        sums=dict(state.get("sums", {})),
        steps=state.get("steps", 0),
        skipped=state.get("skipped", 0),
        global_step=ckpt.get("global_step", 0),
        best_top1=ckpt.get("best_top1", -1.0),
        history=list(ckpt.get("history", [])),
    )
    rng = ckpt.get("rng")
    return {
        "format": FORMAT,
        "model": ckpt["model"],
        "optimizer": ckpt.get("optimizer"),
        "config": config,
        "classes": ckpt.get("classes"),
        "image_size": ckpt.get("image_size") or config.get("image_size") or 224,
        "target_layer": ckpt.get("target_layer"),
        "cam": config["cam"],
        "rng": rng if isinstance(rng, list) or rng is None else [rng],
        "progress": progress.to_dict(),
    }


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG the training loop draws from: torch CPU, CUDA devices, Python's ``random``."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- a run's position
@dataclasses.dataclass
class Progress:
    """Where a run stands: the ``epoch`` in progress (or next to run) and its next ``step``, the
    sums over that epoch's steps of the losses (means over the global batch), how many steps ran
    and how many unreadable images were skipped; the optimizer steps taken in all
    (``global_step``), the best validation top-1 and every finished epoch's log record. Saved in
    every checkpoint, so a run resumed in the middle of an epoch logs the same numbers."""

    epoch: int = 0
    step: int = 0
    sums: dict = dataclasses.field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    history: list = dataclasses.field(default_factory=list)

    def end_epoch(self, record: dict) -> bool:
        """Close the epoch with its log ``record``; True if its validation top-1 is a new best."""
        self.history.append(record)
        improved = "val_top1" in record and record["val_top1"] > self.best_top1
        if improved:
            self.best_top1 = record["val_top1"]
        self.epoch, self.step, self.sums, self.steps, self.skipped = self.epoch + 1, 0, {}, 0, 0
        return improved

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the saver
class CheckpointSaver:
    """The checkpoints of one run folder ``out``: ``last.pt`` (every epoch end, every
    ``every`` steps in the middle of epochs, and when the run is preempted), ``best.pt`` (the
    epoch with the best validation top-1) and, at the end, :data:`WEIGHTS_FILE` (the plain
    weights). Every process calls :meth:`save` (it gathers every process's RNG state); the
    first writes. ``info`` (classes, image size, CAM layer and method) goes into every file.
    """

    def __init__(self, out: str | Path, config, model, optimizer, ctx, *, info: dict, every: int = 0):
        self.out = Path(out)
        self.config, self.model, self.optimizer, self.ctx = config, model, optimizer, ctx
        self.info, self.every = dict(info), every

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def save(self, progress: Progress, name: str = "last.pt") -> None:
        """A checkpoint of the run at ``progress`` as ``OUT/name``."""
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
            "progress": progress.to_dict(),
        }
        save_atomic(payload, self.out / name)

    def end_epoch(self, progress: Progress, record: dict) -> None:
        """Close the epoch in ``progress`` and write ``last.pt`` (and ``best.pt`` if it is the best)."""
        improved = progress.end_epoch(record)
        self.save(progress)
        if improved:
            self.save(progress, "best.pt")

    def after_step(self, progress: Progress, steps_per_epoch: int) -> None:
        """``last.pt`` every ``every`` steps, in the middle of epochs (epoch ends save anyway)."""
        if self.every and progress.global_step % self.every == 0 and progress.step < steps_per_epoch:
            self.save(progress)

    def save_weights(self) -> Path | None:
        """The model's plain state dict as ``OUT/model.safetensors`` (first process)."""
        if not self.ctx.primary:
            return None
        path = self.out / WEIGHTS_FILE
        save_weights(self.model, path, metadata={k: json.dumps(v) for k, v in self.info.items()})
        return path

    def resume(self, source: Path | None) -> Progress:
        """Restore model, optimizer and this process's RNG from ``source`` and return where the
        run stands (a fresh :class:`Progress` when ``source`` is None)."""
        if source is None:
            return Progress()
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
        return Progress(**ckpt["progress"])


def save_weights(model: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """``model.state_dict()`` as a ``.safetensors`` file (atomically): contiguous CPU copies,
    loadable with ``safetensors.torch.load_file`` and ``load_state_dict(strict=True)`` into the
    same torchvision or timm architecture, no cgc needed."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata=metadata)
    _write_atomic(path, lambda fh: fh.write(blob))
