"""The CGC term's gate, as plain values: cross-entropy first, the term switched on once the
training top-1 reaches a threshold (:class:`TermGate`); where a run's gate stands
(:class:`GateState`, saved in checkpoints); and whether a finished run's term ran at all
(:class:`TermOutcome`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TermGate:
    """Cross-entropy first: the CGC term stays off until the training top-1 reaches
    ``threshold``, then its weight ramps up (:meth:`Safeguards.weight` from that position).

    The top-1 is a moving average of the steps' training accuracy (an exponential one whose
    window is about ``window`` steps), so one lucky batch does not open the gate. A gate, not a
    number of epochs: it waits as long as the classifier needs, at any budget and on any
    dataset, and a run that learns at once loses almost nothing. ``threshold`` 0: the term is on
    from the first step. Once open, the gate stays open.
    """

    threshold: float = 0.0
    window: int = 50

    def first(self) -> float | None:
        """Where a run starts: on at position 0 without a threshold, else off (None)."""
        return 0.0 if self.threshold <= 0 else None

    def observe(self, average: float | None, top1: float, on_at: float | None, position: float):
        """``(average, on_at)`` after a step of training accuracy ``top1`` (a fraction) that
        ended at ``position`` (in epochs): the updated moving average and where the term is on."""
        alpha = 2 / (self.window + 1)
        average = top1 if average is None else average + alpha * (top1 - average)
        if on_at is None and average >= self.threshold:
            on_at = position
        return average, on_at


@dataclasses.dataclass(frozen=True)
class TermOutcome:
    """Whether a run's CGC term ran: ``first_step``, the first optimizer step (counted from 1)
    whose loss held the term (None: none did); ``steps`` trained; ``top1``, the gate's moving
    training top-1 at the end (a fraction); the gate's ``threshold``; ``opened_at``, where the
    gate opened in epochs (None: never), which checkpoints written before ``first_step`` was
    recorded carry alone.

    A run whose gate never opened trained the CE baseline under the name of CGC: its results
    table, ``metrics.json`` and one warning say so (:meth:`warning`)."""

    first_step: int | None
    steps: int
    top1: float | None
    threshold: float
    opened_at: float | None = None

    @property
    def ran(self) -> bool:
        if self.first_step is not None:
            return self.first_step <= self.steps
        return self.opened_at is not None  # an older checkpoint: where the gate opened is all it knows

    def summary(self) -> str:
        """One line: where the term ran from, or that it never did and why."""
        if self.ran:
            if self.first_step is None:
                return f"from epoch {self.opened_at:.2f} of the run"
            return f"from step {self.first_step} of {self.steps}"
        return f"never: the gate stayed closed (training top-1 reached {self._top1()}, the gate {self.threshold:g})"

    def warning(self) -> str | None:
        """The line a run whose term never ran ends with: what happened and what to do."""
        if self.ran:
            return None
        return (
            f"the CGC term never ran: training top-1 reached {self._top1()} of the {self.threshold:g} that opens "
            f"its gate, so this model is the CE baseline's. For a model that already predicts (fine-tuning) "
            f"use --term-gate 0; otherwise train longer (--epochs) or lower --term-gate"
        )

    def _top1(self) -> str:
        return "nothing" if self.top1 is None else f"{self.top1:.2f}"

    def to_dict(self) -> dict:
        """The fields ``metrics.json`` records: ``term_first_step`` (a step, or "never"),
        ``term_gate``, ``term_train_top1``."""
        return {
            "term_first_step": self.first_step if self.ran else "never",
            "term_opened_at_epoch": self.opened_at,
            "term_gate": self.threshold,
            "term_train_top1": self.top1,
        }


@dataclasses.dataclass
class GateState:
    """Where a run's gate stands: ``on_at``, the position in epochs where the term was switched
    on (None: not yet); ``first_step``, the first optimizer step (counted from 1) that ran it;
    ``top1``, the moving average of the training top-1 that opens it."""

    on_at: float | None = None
    first_step: int | None = None
    top1: float | None = None
