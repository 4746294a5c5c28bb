"""The learning rate and the CGC weight at every step, as pure functions of the run's position.

A step is identified by ``(epoch, step)`` with ``steps_per_epoch`` steps in an epoch; its
position in epochs runs from ``t = epoch + step / steps_per_epoch`` (its start) to
``t + 1 / steps_per_epoch`` (its end). Being functions of the position, the schedules of a
resumed run are exactly those of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math

KINDS = ("cosine", "step", "constant")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Learning rate: linear warm-up to ``lr`` over ``warmup_epochs``, then ``kind``:

    - ``cosine``: per step from ``lr`` down to 0 at the end of the last epoch;
    - ``step``: ``lr`` times ``gamma`` every ``step_epochs`` epochs;
    - ``constant``: ``lr``.

    The warm-up gives each step the rate of the position it ends at, ``lr * t_end /
    warmup_epochs``, capped at ``lr``: it rises to ``lr`` and never past it, however few steps
    an epoch has (a warm-up shorter than one step is no warm-up: the first step gets ``lr``).

    CGC weight: ``lam``, ramped up linearly over ``lambda_warmup_epochs`` (again by the position
    each step ends at) so that the explanation term acts once the classifier predicts.
    """

    lr: float
    epochs: int
    kind: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1
    lam: float = 1.0
    lambda_warmup_epochs: float = 0.0

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The learning rate of step ``step`` of epoch ``epoch``."""
        t = epoch + step / steps_per_epoch
        if t < self.warmup_epochs:
            return self.lr * min(1.0, (t + 1 / steps_per_epoch) / self.warmup_epochs)
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-8)
            return 0.5 * self.lr * (1 + math.cos(math.pi * min((t - self.warmup_epochs) / span, 1.0)))
        if self.kind == "step":
            return self.lr * self.gamma ** (epoch // self.step_epochs)
        return self.lr

    def lambda_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The weight of the CGC term in step ``step`` of epoch ``epoch``."""
        if self.lambda_warmup_epochs <= 0:
            return self.lam
        t_end = epoch + (step + 1) / steps_per_epoch
        return self.lam * min(1.0, t_end / self.lambda_warmup_epochs)
