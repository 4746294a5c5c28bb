"""What a training run writes as it goes: ``log.jsonl`` (one line per epoch), ``steps.jsonl``
(one line per step) and, with ``--tensorboard``, TensorBoard event files (scalars per step and
per epoch, the overlay grid as an image). Only the first process of a distributed run logs.

A resumed run repeats nothing: the epoch log is written again from the checkpoint's history
and the step log cut after the checkpoint's step, so a preempted or restarted run leaves the
same files as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MissingDependency


class RunLog:
    """The logs of one run in ``out`` (``tensorboard``: also under ``out/tensorboard``)."""

    def __init__(self, out: Path, *, history: list[dict], global_step: int, tensorboard: bool = False):
        self.out = Path(out)
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        steps = self.out / "steps.jsonl"
        kept = []
        if global_step and steps.is_file():
            kept = [line for line in steps.read_text().splitlines() if json.loads(line)["step"] <= global_step]
        steps.write_text("".join(line + "\n" for line in kept))
        self._steps = open(steps, "a")  # noqa: SIM115 - closed by close()
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingDependency("tensorboard", "--tensorboard") from None
            self.board = SummaryWriter(
                str(self.out / "tensorboard"), purge_step=global_step + 1 if global_step else None
            )

    def step(self, step: int, values: dict[str, float]) -> None:
        """One training step: its global index and its numbers (losses, lr, lambda)."""
        self._steps.write(json.dumps({"step": step, **values}) + "\n")
        if self.board is not None:
            for k, v in values.items():
                if k != "epoch":
                    self.board.add_scalar(f"step/{k}", v, step)

    def epoch(self, record: dict, step: int) -> None:
        """One finished epoch (the validation numbers included)."""
        with open(self.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._steps.flush()
        if self.board is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.board.add_scalar(f"epoch/{k}", v, record["epoch"])
            self.board.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        """A picture the run wrote (the overlay grid), into TensorBoard."""
        if self.board is None or not Path(path).is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            self.board.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._steps.close()
        if self.board is not None:
            self.board.close()
