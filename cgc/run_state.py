"""Where a training run stands (:class:`RunState`): what every checkpoint saves so that a run
resumed anywhere, in the middle of an epoch too, continues and logs as if it had not stopped."""

from __future__ import annotations

import dataclasses

from .gate import GateState


@dataclasses.dataclass
class RunState:
    """Where a run stands: the ``epoch`` in progress (or next to run) and its next ``step``, the
    sums over that epoch's steps of the losses (means over the global batch), how many steps ran
    and how many unreadable images were skipped; the optimizer steps taken in all
    (``global_step``), the best value so far of the metric that ranks checkpoints
    (``best_metric``; None before any), every finished epoch's log record, and the CGC term's
    gate (:class:`cgc.safeguards.GateState`). Saved in every checkpoint, so a run resumed in the
    middle of an epoch logs the same numbers."""

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
    gate: GateState = dataclasses.field(default_factory=GateState)

    @classmethod
    def from_dict(cls, values: dict) -> RunState:
        """A state saved by :meth:`to_dict` (a checkpoint's ``state``)."""
        return cls(**{**values, "gate": GateState(**values.get("gate", {}))})

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
