"""Files that survive a crash and load without running code: atomic writes (a temporary file
beside the target, flushed, then renamed over it, so a crash mid-write leaves the previous
file intact) and ``torch.load(weights_only=True)`` with one-line errors. The config, the
checkpoints and the plain weights of a run are all written through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import BadFile, MissingFile


def write_atomic(path: str | Path, write: Callable) -> None:
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
    write_atomic(path, lambda fh: torch.save(obj, fh))


def write_text_atomic(text: str, path: str | Path) -> None:
    """A text file written via a temporary file and an atomic rename."""
    write_atomic(path, lambda fh: fh.write(text.encode()))


def save_weights(model: torch.nn.Module, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """``model.state_dict()`` as a ``.safetensors`` file (atomically): contiguous CPU copies,
    loadable with ``safetensors.torch.load_file`` and ``load_state_dict(strict=True)`` into the
    same architecture, no cgc needed."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata=metadata)
    write_atomic(path, lambda fh: fh.write(blob))


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
