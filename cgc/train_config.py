"""Every setting of a training run in one typed, validated object: :class:`TrainConfig`, made of
sections, each owned by the module that uses it.

| section | class | owner |
|---|---|---|
| ``data`` | :class:`cgc.data.DataConfig` | the datasets (:func:`cgc.data.build_from`) |
| ``model`` | :class:`cgc.models.ModelConfig` | the model factory (:func:`cgc.models.build_from`) |
| ``optim`` | :class:`cgc.optimization.OptimConfig` | the optimizer and the learning rate |
| ``term`` | :class:`cgc.term_config.TermConfig` | the CGC term and its safeguards |
| ``distributed`` | :class:`cgc.distributed.DistributedConfig` | torchrun |
| ``run`` | :class:`cgc.runtime.RunConfig` | where the run runs and what it writes |

The command line keeps one flat flag per setting (``--epochs``, ``--temperature``), the YAML
files one mapping per section; flat files and checkpoints written before the sections read as
they are (:meth:`cgc.settings.Settings.from_dict` routes each name to its section).
:meth:`TrainConfig.validate` checks the whole tree once, before any data or model is built, and
reports every problem in one :class:`cgc.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

from . import ops
from .data import DataConfig
from .distributed import DistributedConfig
from .models import ModelConfig
from .optimization import OptimConfig
from .runtime import RunConfig
from .settings import Settings, section
from .term_config import TermConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig(Settings):
    """Every setting of ``python -m cgc.train``, in sections (see each setting's doc:
    ``--help``, ``docs/training.md``). Build one from its defaults and change it with flat
    names (``TrainConfig().replace(epochs=3, temperature=0.2)``), from flags (:meth:`parse`) or
    from a YAML file (:meth:`load`), then :meth:`validate` it."""

    PROG: ClassVar[str] = "python -m cgc.train"
    DESCRIPTION: ClassVar[str] = "Train a classifier with the CGC term (or the CE / MSE baselines)."
    GROUPS: ClassVar[tuple[str, ...]] = ("data", "model", "optimization", "CGC", "distributed", "run")

    data: DataConfig = section(DataConfig, "what the run trains and validates on")
    model: ModelConfig = section(ModelConfig, "the classifier and where its weights start")
    optim: OptimConfig = section(OptimConfig, "the optimizer and the learning rate")
    term: TermConfig = section(TermConfig, "the CGC term and its safeguards")
    distributed: DistributedConfig = section(DistributedConfig, "torchrun")
    run: RunConfig = section(RunConfig, "where the run runs and what it writes")

    def relations(self, *, world_size: int = 1, device_type: str | None = None) -> list[str]:
        """Settings of different sections that cannot work together, as flag-named messages.
        ``world_size``: processes of the job; ``device_type``: where it runs (None: not known)."""
        return (
            self._data_problems()
            + self._term_problems()
            + self._model_problems()
            + self._job_problems(world_size, device_type)
        )

    def _data_problems(self) -> list[str]:
        data, found = self.data, []
        if data.dataset == "synthetic" and data.train_size < self.optim.batch_size and not data.limited:
            found.append(f"--batch-size {self.optim.batch_size} is larger than the {data.train_size} training images")
        if data.unlabeled is not None and not self.term.enabled:
            found.append("--unlabeled needs a CGC term: use --loss cgc or mse")
        return found

    def _term_problems(self) -> list[str]:
        term, found = self.term, []
        if term.enabled and self.optim.batch_size < 2:
            found.append("--batch-size must be >= 2 for the CGC term (the other images are the negatives)")
        classes = self.data.class_count
        if term.class_negatives and classes is not None and term.class_negatives >= classes:
            found.append(
                f"--class-negatives {term.class_negatives} needs more than {term.class_negatives} classes, got {classes}"
            )
        return found

    def _model_problems(self) -> list[str]:
        found = []
        model = self.model
        stride = model.compact_stride
        size = self.data.image_size
        if model.arch == "compact" and size is not None and 8 <= size < 2 * stride:
            found.append(
                f"--image-size {size} is too small for the compact model: its CAM layer is {stride}x smaller, and "
                f"a heatmap needs at least 2x2 pixels (use >= {2 * stride})"
            )
        return found

    def _job_problems(self, world_size: int, device_type: str | None) -> list[str]:
        found = []
        run = self.run
        if run.resume not in (None, "auto"):
            path = Path(run.resume)
            if not (path.is_file() or (path / "last.pt").is_file()):
                found.append(f"--resume {run.resume}: no checkpoint there (a last.pt file or a run folder holding one)")
        if run.backend is not None:
            if run.backend not in ("auto", *ops.BACKENDS):
                found.append(f"--backend must be one of auto, {', '.join(ops.BACKENDS)}, got {run.backend!r}")
            elif run.backend != "auto" and (why := ops.unavailable(run.backend, device_type)):
                found.append(f"--backend {run.backend}: {why}")
        batch, unlabeled_batch = self.optim.batch_size, self.data.unlabeled_batch_size
        for flag, size in (("--batch-size", batch), ("--unlabeled-batch-size", unlabeled_batch)):
            if size is not None and size % world_size:
                found.append(
                    f"{flag} {size} is the global batch and must divide evenly over the {world_size} processes"
                )
        local = min(batch, unlabeled_batch or batch) // world_size
        if self.term.loss == "cgc" and world_size > 1 and self.distributed.negatives == "local" and local < 2:
            found.append("--negatives local needs at least 2 images per process (the others are the negatives)")
        if self.distributed.sync_bn:
            if device_type is not None and device_type != "cuda":
                found.append(
                    "--sync-bn needs CUDA devices: SyncBatchNorm has no CPU kernel. On CPUs use --norm group "
                    "(the compact model), whose statistics do not depend on the batch split"
                )
            elif world_size < 2:
                found.append("--sync-bn needs more than one process (torchrun --nproc_per_node N)")
        return found


def parse(argv: list[str] | None = None) -> TrainConfig:
    """The config of ``python -m cgc.train``'s command line (not yet validated)."""
    return TrainConfig.parse(argv)


def expected_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), read before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))
