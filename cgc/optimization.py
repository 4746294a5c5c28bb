"""The optimizer and the learning rate at every step: :class:`OptimConfig` (the run's settings
of both), :func:`build_optimizer` and :class:`Schedule`, a pure function of the run's position.

A step is identified by ``(epoch, step)`` with ``steps_per_epoch`` steps in an epoch; its
position in epochs runs from ``t = epoch + step / steps_per_epoch`` (its start) to
``t + 1 / steps_per_epoch`` (its end). Being a function of the position, the schedule of a
resumed run is exactly that of an uninterrupted one (the CGC term's weight follows the same
rule: :meth:`cgc.safeguards.Safeguards.weight`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .settings import Settings, at_least, fraction, non_negative, positive, setting, unit_interval

KINDS = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
GROUP = "optimization"


@dataclasses.dataclass(frozen=True)
class OptimConfig(Settings):
    """The optimizer and the learning rate's schedule (see each setting's doc)."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP,)

    optimizer: str = setting(
        "adamw", "adamw (betas (momentum, 0.999)) or sgd (with --momentum)", GROUP, choices=OPTIMIZERS
    )
    epochs: int = setting(10, "training epochs", GROUP, check=at_least(1))
    batch_size: int = setting(
        32, "global batch: under torchrun each of N processes takes batch-size / N", GROUP, check=at_least(1)
    )
    lr: float = setting(3e-3, "learning rate", GROUP, check=positive)
    head_lr: float | None = setting(None, "learning rate of the classifier head (default: --lr)", GROUP, check=positive)
    momentum: float = setting(0.9, "SGD momentum (AdamW's beta1)", GROUP, check=unit_interval)
    weight_decay: float = setting(
        0.05, "weight decay (not on biases and norm parameters; decoupled with adamw)", GROUP, check=non_negative
    )
    schedule: str = setting(
        "cosine",
        "cosine: per step to 0 at the end; step: x --lr-gamma every --lr-step epochs; constant",
        GROUP,
        choices=KINDS,
    )
    lr_step: int = setting(30, "step schedule: epochs between decays", GROUP, check=at_least(1))
    lr_gamma: float = setting(0.1, "step schedule: factor of each decay", GROUP, check=fraction)
    warmup_epochs: float = setting(
        0.5, "linear warm-up of the learning rate from 0 to --lr over these epochs", GROUP, check=non_negative
    )

    def schedule_of(self) -> Schedule:
        """The learning rate per step."""
        return Schedule(self.lr, self.epochs, self.schedule, self.warmup_epochs, self.lr_step, self.lr_gamma)


def param_groups(model, head_names, *, weight_decay: float, head_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: weight decay on weights only (not biases and norm parameters); the
    classifier head's groups (``head_names``: the dotted names of its layers, both heads of a
    distilled DeiT: :func:`cgc.models.head_names`) carry ``lr_scale`` (--head-lr / --lr), which
    :func:`set_learning_rate` multiplies in."""
    heads = tuple(name + "." for name in head_names)
    groups = []
    for in_head, scale in ((False, 1.0), (True, head_lr_scale)):
        for decay in (True, False):
            params = [
                p for n, p in model.named_parameters() if n.startswith(heads) == in_head and (p.ndim > 1) == decay
            ]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
    return groups


def build_optimizer(model, config: OptimConfig, head_names) -> torch.optim.Optimizer:
    """SGD with momentum (the reference recipe) or AdamW (betas (momentum, 0.999)) over
    :func:`param_groups`; built after the head has the dataset's class count."""
    head_scale = (config.head_lr or config.lr) / config.lr
    groups = param_groups(model, head_names, weight_decay=config.weight_decay, head_lr_scale=head_scale)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate: ``lr`` times the group's ``lr_scale`` (the head's --head-lr)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Learning rate: linear warm-up to ``lr`` over ``warmup_epochs``, then ``kind``:

    - ``cosine``: per step from ``lr`` down to 0 at the end of the last epoch;
    - ``step``: ``lr`` times ``gamma`` every ``step_epochs`` epochs;
    - ``constant``: ``lr``.

    The warm-up gives each step the rate of the position it ends at, ``lr * t_end /
    warmup_epochs``, capped at ``lr``: it rises to ``lr`` and never past it, however few steps
    an epoch has (a warm-up shorter than one step is no warm-up: the first step gets ``lr``).
    """

    lr: float
    epochs: int
    kind: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1

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
