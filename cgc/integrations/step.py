"""The CGC term inside another framework's training step, written once for every trainer: the
Hugging Face ``Trainer`` (:mod:`cgc.integrations.huggingface`), Lightning
(:mod:`cgc.integrations.lightning`) and your own loop.

:class:`CGCStep` holds the term on the model the framework runs (DDP-wrapped or not: the hook
goes on the layer inside it, the negatives are gathered from every process), the term's
safeguards (:class:`cgc.safeguards.Safeguards`: the gate, λ's ramp, the CAMs' class, the
gradient bound), the training top-1 that opens the gate (summed over the processes at the end
of each optimizer step), and the numbers a trainer logs. Every weight is a function of the
position in epochs where a step ends, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed, structure, transforms
from ..errors import ConfigError
from ..gate import GateState, TermOutcome
from ..safeguards import Safeguards
from ..term import CGCOutput, CGCTerm
from ..term_config import TermConfig

NEGATIVES = distributed.NEGATIVES


class CGCStep:
    """One run's CGC term in another trainer's steps (``config``: the term's settings;
    ``negatives``: ``global``, every process's heatmaps, or ``local``; ``seed``: keys the crops;
    ``backend``: the ops').

    Per optimizer step: :meth:`loss` (or, for a trainer that computes its own cross-entropy,
    :meth:`term` and :meth:`weight`) on each micro-batch, then :meth:`end_step` once the
    optimizer stepped. Each image's crop is drawn from a key of (seed, step, its place in the
    step's global batch), so one process with the whole batch, N processes with a share each and
    accumulated micro-batches draw the same crops. :attr:`state` is what a checkpoint keeps
    (:meth:`state_dict`)."""

    def __init__(self, config: TermConfig, *, negatives: str = "global", seed: int = 0, backend: str | None = None):
        config.validate()
        if not config.enabled:
            raise ConfigError("loss='ce' is the baseline without a CGC term: train without CGCStep")
        if negatives not in NEGATIVES:
            raise ConfigError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        self.config, self.negatives, self.seed, self.backend = config, negatives, seed, backend
        self.guard = Safeguards(config)
        self._term: CGCTerm | None = None
        self._model: nn.Module | None = None
        self._ctx: distributed.Context | None = None
        self._correct = self._count = 0.0
        self._micro = 0  # micro-batches of this optimizer step so far
        self._logged: dict[str, float] = {}

    # ------------------------------------------------------------------------- the term
    def term_for(self, model: nn.Module) -> CGCTerm:
        """The term on ``model``, the module the trainer runs (its DistributedDataParallel
        wrapper under torchrun): hooked at the layer inside it, built at the first call on every
        process (the gather group is created collectively) and again if the trainer wraps the
        model anew."""
        if model is not self._model:
            if self._term is not None:
                self._term.close()
            device = next(model.parameters()).device
            self._ctx = distributed.joined(device)
            _, prefix = structure.unwrap(model)
            layer = prefix + self.config.target_layer if self.config.target_layer else None
            gather = self._ctx.gather if self._ctx.distributed and self.negatives == "global" else None
            self._term = CGCTerm.from_config(
                model, self.config, target_layer=layer, gather=gather, backend=self.backend
            )
            self._model = model
        return self._term

    def term(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, step: int) -> CGCOutput:
        """The term of a micro-batch of optimizer step ``step`` (counted from 1): both views in
        one forward pass of ``model``, the CAMs of the class the safeguards choose (the labels,
        or the predicted class)."""
        if labels is None and self.config.cam_target == "label":
            raise ConfigError(
                "the CGC term explains the labels (cam_target 'label'), but the batch has none: give the "
                "dataset labels, or set cam_target 'predicted'"
            )
        term = self.term_for(model)
        targets = None if labels is None else self.guard.targets(labels)
        return term(images, theta=self._theta(images, step), targets=targets)

    def _theta(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """This process's crops of its micro-batch, keyed by the images' places in the step's
        global batch: micro-batch after micro-batch, each the processes' equal shares in rank
        order (so accumulated micro-batches draw the crops of one whole batch)."""
        b, _, h, w = images.shape
        rank, world = (self._ctx.rank, self._ctx.world_size) if self._ctx is not None else (0, 1)
        first = (self._micro * world + rank) * b
        keys = transforms.sample_keys(self.seed, step, range(first, first + b), "aug")
        self._micro += 1
        c = self.config
        crops = transforms.random_crop_flip(
            b,
            h,
            w,
            scale=tuple(c.crop_scale),
            ratio=tuple(c.crop_ratio),
            flip_p=c.flip_p,
            vflip_p=0.5 if c.vflip else 0.0,
            sampler=c.crop_sampler,
            keys=keys,
            device=images.device,
        )
        return crops.theta()

    def weight(self, lam: float, ce: torch.Tensor, out: CGCOutput):
        """The term's weight this step: ``lam``, lowered by the gradient bound where it applies
        (norms summed over the processes)."""
        reduce = self._ctx.all_reduce_sum if self._ctx is not None and self._ctx.distributed else None
        return self.guard.bounded(lam, ce, out.loss, out.activations, reduce)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int, per_epoch: float):
        """``(loss, logits)`` of one micro-batch of optimizer step ``step`` (counted from 1; an
        epoch has ``per_epoch`` of them): cross-entropy of the original view, plus the weighted
        term once the gate is open. While the gate is closed the step is the plain
        cross-entropy one."""
        lam = self.guard.weight(position(step, per_epoch))
        if lam == 0:
            logits = structure.logits_of(model(images))
            loss = F.cross_entropy(logits, labels)
        else:
            out = self.term(model, images, labels, step)
            logits = out.logits
            ce = F.cross_entropy(logits, labels)
            w = self.weight(lam, ce, out)
            loss = ce + w * out.loss
            self.record(out.loss, w)
        self.count(logits, labels)
        return loss, logits

    # ------------------------------------------------------------------------- the gate and the logs
    def count(self, logits: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Add a micro-batch's correct predictions to this optimizer step's training top-1."""
        if labels is not None:
            self._correct += float((logits.detach().argmax(1) == labels).sum())
            self._count += float(labels.numel())

    def record(self, term_loss: torch.Tensor, weight) -> None:
        """Note a micro-batch's term and the weight it had, for :meth:`logs`."""
        for key, value in (("cgc_loss", float(term_loss.detach())), ("cgc_lambda", float(weight))):
            total, n = self._logged.get(key, 0.0), self._logged.get(key + "/n", 0.0)
            self._logged[key], self._logged[key + "/n"] = total + value, n + 1

    def end_step(self, step: int, per_epoch: float) -> None:
        """After optimizer step ``step`` (counted from 1; an epoch has ``per_epoch`` of them):
        the step's training top-1 over every process opens the gate once it is high enough."""
        counts = torch.tensor([self._correct, self._count], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self._ctx.device if self._ctx is not None else torch.device("cpu")
            counts = counts.to(device)
            dist.all_reduce(counts)
        correct, count = counts.tolist()
        self._correct = self._count = 0.0
        self._micro = 0
        if count:
            self.guard.observe(correct / count, position(step, per_epoch), step)

    def logs(self) -> dict[str, float]:
        """The means since the last call, over every process (each must call it), of the term
        (``cgc_loss``) and its weight (``cgc_lambda``; 0 while the gate is closed), for a
        trainer's log."""
        keys = ("cgc_loss", "cgc_lambda")
        sums = torch.tensor([self._logged.get(k + s, 0.0) for k in keys for s in ("", "/n")], dtype=torch.float64)
        self._logged = {}
        if self._ctx is not None and self._ctx.distributed:
            sums = self._ctx.all_reduce_sum(sums.to(self._ctx.device)).cpu()
        loss, n_loss, lam, n_lam = sums.tolist()
        found = {"cgc_lambda": lam / n_lam if n_lam else 0.0}
        if n_loss:
            found["cgc_loss"] = loss / n_loss
        return found

    def outcome(self, steps: int) -> TermOutcome | None:
        """Whether the term ran in the ``steps`` a run took, and from which step."""
        return self.guard.outcome(steps)

    # ------------------------------------------------------------------------- checkpoints
    @property
    def state(self) -> GateState:
        return self.guard.state

    def state_dict(self) -> dict:
        """The gate's state, as plain values (a checkpoint keeps it for an exact resume)."""
        return dataclasses.asdict(self.guard.state)

    def load_state_dict(self, state: dict) -> None:
        self.guard.state = GateState(**state)

    def close(self) -> None:
        """Remove the term's hook."""
        if self._term is not None:
            self._term.close()
        self._term = self._model = None


def position(step: int, steps_per_epoch: float) -> float:
    """Where optimizer step ``step`` (counted from 1) ends, in epochs."""
    if not steps_per_epoch > 0 or not math.isfinite(steps_per_epoch):
        raise ConfigError(f"steps per epoch must be a positive number, got {steps_per_epoch}")
    return step / steps_per_epoch
