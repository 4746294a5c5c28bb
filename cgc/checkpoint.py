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


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_atomic`, safely (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a cgc checkpoint): {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a cgc checkpoint (no 'model' entry)")
    return ckpt


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

