"""CGC in PyTorch Lightning: :class:`CGCClassifier`, a ``LightningModule`` that trains a classifier
with cross-entropy plus the term and logs both. A ``Callback`` cannot change the loss
(``on_before_backward`` returns nothing), so the term lives in the module's ``training_step``;
your own ``LightningModule`` takes it in a few lines with :class:`cgc.integrations.CGCStep`
(docs/integrations.md).

Needs ``lightning`` (the ``lightning`` extra: ``pip install "cgc[lightning]"``). Under
``Trainer(strategy="ddp")`` the step runs inside Lightning's DDP wrapper, the negatives are
gathered from every process and the gate sees the training top-1 of the whole global batch; the
gate's state is saved in Lightning's checkpoints and restored on resume; bf16 compares the
heatmaps in float32; λ 0 trains with cross-entropy alone, the term never computed.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ..structure import logits_of
from ..term import term_settings
from ..term_config import TermConfig
from .step import CGCStep

STATE_KEY = "cgc_gate"


class CGCClassifier(L.LightningModule):
    """Train ``model`` (any classifier cgc explains) with cross-entropy plus the CGC term of
    ``config`` (:class:`cgc.TermConfig`, changed by ``settings`` by name: ``lam=``,
    ``temperature=``, ``term_gate=``, ...). Batches are ``(images, labels)``; AdamW with ``lr``
    and ``weight_decay`` (override :meth:`configure_optimizers` for another). ``negatives``:
    ``global`` (every process's heatmaps under DDP) or ``local``; ``seed`` keys the crops.

    Logs ``train_loss``, ``train_ce``, ``train_top1``, ``cgc_loss`` and ``cgc_lambda`` per step,
    and ``val_loss`` / ``val_top1`` in validation."""

    def __init__(
        self,
        model: nn.Module,
        config: TermConfig | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        negatives: str = "global",
        seed: int = 0,
        **settings,
    ):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.config = (config or TermConfig()).replace(**settings)
        self.cgc = CGCStep(term_settings(self.config), negatives=negatives, seed=seed) if self.config.lam > 0 else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(images))

    def steps_per_epoch(self) -> float:
        """Optimizer steps in an epoch, as the trainer plans them."""
        trainer = self.trainer
        if trainer.max_epochs and trainer.max_epochs > 0:
            return trainer.estimated_stepping_batches / trainer.max_epochs
        return trainer.num_training_batches / trainer.accumulate_grad_batches

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.cgc is None:
            logits = self(images)
            loss = ce = F.cross_entropy(logits, labels)
        else:
            loss, logits = self.cgc.loss(self.model, images, labels, self.global_step + 1, self.steps_per_epoch())
            ce = F.cross_entropy(logits.detach(), labels)
            self.log_dict(self.cgc.logs(), on_step=True, prog_bar=True)
        top1 = (logits.detach().argmax(1) == labels).float().mean()
        values = {"train_loss": loss.detach(), "train_ce": ce.detach(), "train_top1": top1}
        self.log_dict(values, on_step=True, sync_dist=True)  # the global batch's
        return loss

    def optimizer_step(self, *args, **kwargs):
        """The optimizer's step, then the gate's look at the step's training top-1 (before any
        callback saves a checkpoint after the batch)."""
        super().optimizer_step(*args, **kwargs)
        if self.cgc is not None:
            self.cgc.end_step(self.global_step, self.steps_per_epoch())

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.log_dict(
            {"val_loss": F.cross_entropy(logits, labels), "val_top1": (logits.argmax(1) == labels).float().mean()},
            sync_dist=True,
        )

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.cgc is not None:
            checkpoint[STATE_KEY] = self.cgc.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.cgc is not None and STATE_KEY in checkpoint:
            self.cgc.load_state_dict(checkpoint[STATE_KEY])

    def on_train_end(self) -> None:
        if self.cgc is not None:
            self.cgc.close()


__all__ = ["STATE_KEY", "CGCClassifier"]
