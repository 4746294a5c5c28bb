"""CGC in Hugging Face's ``Trainer``: :class:`CGCTrainer` adds the term in ``compute_loss``, the
documented place for a loss that needs the inputs and the model's internals, and
:class:`CGCTrainingArguments` carries the term's settings as ``cgc_*`` arguments.

Needs ``transformers`` (>= 4.46, which passes ``num_items_in_batch``) and ``accelerate``: the
``hf`` extra (``pip install "cgc[hf]"``). What the ``Trainer``'s habits ask of a term, handled
here:

- batches of ``pixel_values`` and ``labels`` (the columns an image classifier's ``forward``
  names, which ``remove_unused_columns`` keeps); models that return a ``ModelOutput``;
- gradient accumulation: the loss is scaled as the ``Trainer`` scales its own (over the
  accumulated batch's items where the model takes ``num_items_in_batch``, else divided by the
  accumulation steps), so two micro-batches of 8 give the gradient of one batch of 16;
- ``torchrun``: the model arrives wrapped in DistributedDataParallel; the term hooks the layer
  inside it and gathers the negatives of every process;
- bf16: the heatmaps are compared in float32;
- the logs: ``cgc_loss`` and ``cgc_lambda`` join the ``Trainer``'s own, so they reach
  TensorBoard and every ``report_to`` target;
- checkpoints: the gate's state is saved in each ``checkpoint-N`` folder (``cgc_state.json``)
  and read back by ``train(resume_from_checkpoint=...)``;
- ``cgc_lambda=0``: the term is never computed and the step is the plain ``Trainer``'s.

FSDP and DeepSpeed are refused by name: the term's second-order graph through sharded or
partitioned parameters is untested.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..cam import CAM
from ..errors import ConfigError
from ..settings import flag_of
from ..structure import logits_of
from ..term_config import TermConfig
from .step import NEGATIVES, CGCStep, position

PREFIX = "cgc_"
STATE_FILE = "cgc_state.json"


def argument_name(setting: str) -> str:
    """A term setting's name among ``TrainingArguments``: its flag's, prefixed (``lam``, whose
    flag is ``--lambda``, is ``cgc_lambda``)."""
    return PREFIX + flag_of(TermConfig.leaves()[setting][1]).removeprefix("--").replace("-", "_")


def _argument(name: str, field: dataclasses.Field, hint) -> tuple[str, type, dataclasses.Field]:
    """``TrainingArguments``' form of one of the term's settings: named as its flag, prefixed,
    its doc as help, its choices, a tuple as a list (``--cgc_crop_scale 0.2 1.0``)."""
    meta = {"help": field.metadata["doc"]}
    choices = field.metadata["choices"]
    if choices is not None:
        meta["choices"] = list(choices() if callable(choices) else choices)
    if typing.get_origin(hint) is tuple:
        default = list(field.default)
        return argument_name(name), list[float], dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return argument_name(name), hint, dataclasses.field(default=field.default, metadata=meta)


def _term_arguments() -> list[tuple[str, type, dataclasses.Field]]:
    hints = typing.get_type_hints(TermConfig)
    fields = [_argument(name, f, hints[name]) for name, (_, f, _) in TermConfig.leaves().items() if name != "loss"]
    kind = dataclasses.field(
        default="cgc", metadata={"help": "cgc: InfoNCE over heatmaps; mse: no negatives", "choices": ["cgc", "mse"]}
    )
    negatives = dataclasses.field(
        default="global",
        metadata={
            "help": "InfoNCE negatives under torchrun: every process's, or each process's own",
            "choices": list(NEGATIVES),
        },
    )
    return [*fields, (PREFIX + "loss", str, kind), (PREFIX + "negatives", str, negatives)]


def _term_config(self) -> TermConfig:
    """The term's settings of these arguments (:class:`cgc.TermConfig`)."""
    names = [n for n in TermConfig.leaves() if n != "loss"]
    values = {n: getattr(self, argument_name(n)) for n in names}
    values = {n: tuple(v) if isinstance(v, list) else v for n, v in values.items()}
    return TermConfig(loss=getattr(self, PREFIX + "loss"), **values)


def _post_init(self) -> None:
    TrainingArguments.__post_init__(self)
    try:  # one error naming every bad cgc_* value, before any training
        self.term_config().validate()
    except ConfigError as err:
        message = str(err)
        for name, (_, field, _) in TermConfig.leaves().items():
            message = message.replace(flag_of(field) + " ", argument_name(name) + " ")
        raise ConfigError(message) from None


CGCTrainingArguments = dataclasses.make_dataclass(
    "CGCTrainingArguments",
    _term_arguments(),
    bases=(TrainingArguments,),
    namespace={"term_config": _term_config, "__post_init__": _post_init},
)
CGCTrainingArguments.__module__ = __name__
CGCTrainingArguments.__doc__ = """``TrainingArguments`` with the CGC term's settings, each a
:class:`cgc.TermConfig` setting under its flag's name with the ``cgc_`` prefix (``cgc_lambda``:
λ, 0 for the plain ``Trainer``; ``cgc_temperature``, ``cgc_crop_scale``, ``cgc_cam``,
``cgc_class_negatives``, the safeguards ``cgc_term_gate``, ``cgc_lambda_warmup_epochs``,
``cgc_cam_target``, ``cgc_grad_bound``, ``cgc_heatmap_floor``, ...), plus ``cgc_loss`` (``cgc``
or ``mse``) and ``cgc_negatives`` (``global`` or ``local``). ``HfArgumentParser`` reads them from
the command line as ``--cgc_temperature 0.5``."""


class _CGCCallback(TrainerCallback):
    """After each optimizer step the gate sees the step's training top-1; each checkpoint keeps
    the gate's state."""

    def __init__(self, trainer: CGCTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            self.trainer._per_epoch = max(len(train_dataloader) // args.gradient_accumulation_steps, 1)

    def on_step_end(self, args, state, control, **kwargs):
        step = self.trainer.cgc
        if step is not None:
            step.end_step(state.global_step, self.trainer.steps_per_epoch())

    def on_save(self, args, state, control, **kwargs):
        step = self.trainer.cgc
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if step is not None and state.is_world_process_zero and folder.is_dir():
            (folder / STATE_FILE).write_text(json.dumps(step.state_dict()) + "\n")


class CGCTrainer(Trainer):
    """``Trainer`` with the CGC term: each training loss is cross-entropy of the batch's
    ``pixel_values`` plus λ times the term (``args``: :class:`CGCTrainingArguments`). The term's
    own settings and its safeguards are the command line's (:class:`cgc.TermConfig`); the
    model is any image classifier cgc explains (a CAM layer found, or ``cgc_target_layer``).

    Bad input is refused before training starts: a model without a CAM layer cgc can find, a
    dataset without labels while the CAMs explain the labels, FSDP or DeepSpeed."""

    def __init__(self, model=None, args=None, *rest, **kwargs):
        if not isinstance(args, CGCTrainingArguments):
            raise ConfigError(
                "CGCTrainer takes CGCTrainingArguments (TrainingArguments with the term's cgc_* settings)"
            )
        config = args.term_config()
        if config.lam > 0:  # before the Trainer's own checks, which would name something else
            if args.fsdp:
                raise ConfigError("the CGC term does not run under FSDP (sharded parameters): use DDP (torchrun)")
            if args.deepspeed:
                raise ConfigError("the CGC term does not run under DeepSpeed: use DDP (torchrun)")
        super().__init__(model, args, *rest, **kwargs)
        self._per_epoch: float | None = None
        self.cgc = CGCStep(config, negatives=args.cgc_negatives, seed=args.seed) if config.lam > 0 else None
        if self.cgc is not None:
            self._check(config)
            self.add_callback(_CGCCallback(self))

    def _check(self, config: TermConfig) -> None:
        """A CAM layer cgc can find, and labels where the CAMs explain them, or an error."""
        with CAM(self.model, config.target_layer, method=config.cam):
            pass
        first = self.train_dataset[0] if self.train_dataset is not None and len(self.train_dataset) else None
        if config.cam_target == "label" and isinstance(first, dict) and not {"labels", "label"} & set(first):
            raise ConfigError(
                f"the CGC term explains the labels (cgc_cam_target 'label'), but the dataset's examples hold "
                f"{sorted(first)}: give them labels, or set cgc_cam_target 'predicted'"
            )

    def steps_per_epoch(self) -> float:
        """Optimizer steps in an epoch, as the ``Trainer`` counts them: the training loader's
        batches over the accumulation steps (read when training begins; without a sized loader,
        the planned steps over the planned epochs)."""
        if self._per_epoch is None:
            state = self.state
            self._per_epoch = state.max_steps / max(state.num_train_epochs, 1) if state.max_steps else 1.0
        return self._per_epoch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step + 1
        training = self.cgc is not None and model.training
        lam = self.cgc.guard.weight(position(step, self.steps_per_epoch())) if training else 0.0
        if lam == 0:
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if self.cgc is not None and model.training:
                self.cgc.count(logits_of(outputs), inputs.get("labels"))
            return (loss, outputs) if return_outputs else loss
        labels = inputs["labels"]
        out = self.cgc.term(model, inputs["pixel_values"], labels, step)
        loss = self._loss(out, labels, lam, num_items_in_batch)
        self.cgc.count(out.logits, labels)
        return (loss, {"logits": out.logits}) if return_outputs else loss

    def _loss(self, out, labels: torch.Tensor, lam: float, num_items_in_batch) -> torch.Tensor:
        """Cross-entropy plus the weighted term, scaled as the ``Trainer`` scales its own loss:
        over the accumulated batch's items where the model takes ``num_items_in_batch`` (then
        times the processes, whose gradients DDP averages, when the items are counted over all
        of them), else a mean over this micro-batch (the ``Trainer`` divides it by the
        accumulation steps)."""
        smoothing = self.args.label_smoothing_factor
        ce = F.cross_entropy(out.logits, labels, ignore_index=-100, label_smoothing=smoothing)
        w = self.cgc.weight(lam, ce, out)
        self.cgc.record(out.loss, w)
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            return ce + w * out.loss
        items = labels.ne(-100).sum()
        loss = (ce + w * out.loss) * items / num_items_in_batch
        if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.cgc is not None and "loss" in logs:  # a training log: the term's numbers since the last one
            logs = {**logs, **self.cgc.logs()}
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; resuming also brings back where the term's gate stood."""
        if self.cgc is not None and resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
            saved = Path(folder) / STATE_FILE if folder else None
            if saved is not None and saved.is_file():
                self.cgc.load_state_dict(json.loads(saved.read_text()))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.cgc is not None:
                self.cgc.close()

    def term_outcome(self):
        """Whether the term ran in this training, and from which step (None without a term)."""
        return None if self.cgc is None else self.cgc.outcome(self.state.global_step)


__all__ = ["STATE_FILE", "CGCTrainer", "CGCTrainingArguments"]
