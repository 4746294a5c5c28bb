"""Checkpoints that are written atomically and load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: model and
optimizer state, the completed epoch, the run's arguments, the RNG states and the history.
It is written to a temporary file in the same folder, flushed to disk and renamed over the
old one, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

from .errors import BadFile, MissingFile


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    except Exception as err:  # noqa: BLE001 - truncated/corrupt/refused files raise many types
        text = str(err)
        found = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
        if found:
            why = found[0].removeprefix("WeightsUnpickler error: ")
            raise BadFile(f"{what} {path} holds Python objects, not just tensors, and loading it could run "
                          f"code ({why}); cgc loads only plain tensors: save a state_dict "
                          f"(torch.save(model.state_dict(), path))") from err
        first = next((line.strip() for line in text.splitlines() if "error:" in line), None) or \
            (text.strip().splitlines()[0] if text.strip() else type(err).__name__)
        raise BadFile(f"cannot read {what} {path}: corrupt, truncated or not a PyTorch file ({first})") from err


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_atomic`, safely (``weights_only=True``); a run
    folder means its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    ckpt = safe_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise BadFile(f"{path} is not a cgc checkpoint (no 'model' entry)")
    return ckpt


def cam_method(train_args: dict) -> str:
    """The CAM method a run was trained with (``--cam``; checkpoints written before it existed
    stored ``cam_weighting``: ``elementwise`` is HiResCAM, ``pooled`` Grad-CAM)."""
    if train_args.get("cam"):
        return train_args["cam"]
    return {"elementwise": "hirescam", "pooled": "gradcam"}.get(train_args.get("cam_weighting"), "gradcam")


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

