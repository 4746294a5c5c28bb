"""The safeguards a training loop applies around the CGC term, in one object that every trainer
shares (``python -m cgc.train``, the Hugging Face ``Trainer``, Lightning, your own loop).

At the start of training a network predicts nothing and the easiest heatmaps to make agree are
those of a network that stays there: a term at full weight can hold a run at chance. So:

- the gate (:class:`cgc.gate.TermGate`): cross-entropy first; the term waits until the training
  top-1 reaches ``--term-gate``, and a run whose gate never opened says so
  (:class:`cgc.gate.TermOutcome`);
- the weight λ ramps in over ``--lambda-warmup-epochs`` from where the gate opened;
- the CAMs explain the label (``--cam-target label``) instead of the predicted class;
- optionally, the term's gradient at the CAM layer is bounded by cross-entropy's
  (:func:`bounded_lambda`, ``--grad-bound``).

:class:`Safeguards` holds them with the gate's state (:class:`cgc.gate.GateState`, saved in
checkpoints),
built from :class:`cgc.term_config.TermConfig`. Every weight is a function of the run's position
in epochs, so a resumed run follows the same curve.
"""

from __future__ import annotations

import torch

from .gate import GateState, TermGate, TermOutcome
from .term_config import TermConfig


def bounded_lambda(
    lam: float,
    ce: torch.Tensor,
    term_loss: torch.Tensor,
    activations: torch.Tensor,
    bound: float,
    all_reduce_sum=None,
) -> torch.Tensor:
    """The term's weight with its gradient bounded by cross-entropy's (an adaptive λ):
    ``min(lam, bound * |dCE/dA| / |dterm/dA|)``, A the CAM layer's activations
    (:attr:`CGCOutput.activations`, from which both losses were computed).

    The norms are over the whole batch; ``all_reduce_sum`` (e.g.
    :meth:`cgc.distributed.Context.all_reduce_sum`) sums their squares over the processes, so
    every process gets the weight one process would. Each loss is a mean over this process's
    images, so the ratio does not depend on how the batch is split. The weight is detached: it
    scales the term's gradient and adds none of its own. Costs two gradients of the losses with
    respect to A (the layers after the CAM layer, run backward twice more).
    """
    if bound <= 0:
        raise ValueError(f"the gradient bound must be positive, got {bound}")
    # the backward runs in this thread on a CPU: outside autocast, so that each op's gradient keeps
    # the dtypes its forward recorded
    with torch.autocast(activations.device.type, enabled=False):
        grads = [torch.autograd.grad(v, activations, retain_graph=True)[0] for v in (ce, term_loss)]
    squares = torch.stack([g.detach().double().square().sum() for g in grads])
    if all_reduce_sum is not None:
        squares = all_reduce_sum(squares)
    norm_ce, norm_term = squares.sqrt().unbind()
    # a term without gradient at A keeps its full weight (the ratio is +inf, clamped to lam)
    return (bound * norm_ce / norm_term.clamp_min(1e-300)).clamp(max=lam).to(term_loss.dtype)


class Safeguards:
    """The loop-level safeguards of one run's term (``config``: its :class:`TermConfig`; for
    ``--loss ce`` the weight is always 0 and the gate open, as the CE baseline has no term).

    Per step: :meth:`weight` (λ for a step ending at a position), :meth:`targets` (the classes
    the CAMs explain), :meth:`bounded` (λ lowered where the term's gradient would exceed the
    bound), then :meth:`observe` with the step's training top-1. :attr:`state` is what a
    checkpoint keeps; :meth:`outcome` says whether the term ran."""

    def __init__(self, config: TermConfig):
        self.config = config
        self.gate = TermGate(config.term_gate if config.enabled else 0.0)
        on = self.gate.first()
        self.state = GateState(on, 1 if on is not None else None)

    def weight(self, position: float) -> float:
        """λ of a step that ends at ``position`` (in epochs): 0 while the gate is closed, then
        ramped in linearly over ``lambda_warmup_epochs`` from where it opened."""
        config, on = self.config, self.state.on_at
        if on is None or not config.enabled:
            return 0.0
        if config.lambda_warmup_epochs <= 0:
            return config.lam
        return config.lam * min(1.0, max(0.0, position - on) / config.lambda_warmup_epochs)

    def targets(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The classes the labeled images' CAMs explain: their labels, or None (the class
        predicted on the original view)."""
        return labels if self.config.cam_target == "label" else None

    def bounded(self, lam, ce: torch.Tensor, term_loss: torch.Tensor, activations, all_reduce_sum=None):
        """``lam``, or with a gradient bound :func:`bounded_lambda` of it (a detached tensor)."""
        if self.config.grad_bound <= 0:
            return lam
        return bounded_lambda(lam, ce, term_loss, activations, self.config.grad_bound, all_reduce_sum)

    def observe(self, top1: float, position: float, step: int) -> None:
        """After optimizer step ``step`` (counted from 1) of training top-1 ``top1`` (a fraction,
        over the global batch) that ended at ``position`` (in epochs): the gate's average, and
        where it opened."""
        was_off = self.state.on_at is None
        self.state.top1, self.state.on_at = self.gate.observe(self.state.top1, top1, self.state.on_at, position)
        if was_off and self.state.on_at is not None:
            self.state.first_step = step + 1  # the term runs from the next step

    def outcome(self, steps: int) -> TermOutcome | None:
        """Whether the term ran in the ``steps`` a run took (None: the CE baseline)."""
        if not self.config.enabled:
            return None
        return TermOutcome(self.state.first_step, steps, self.state.top1, self.gate.threshold, self.state.on_at)
