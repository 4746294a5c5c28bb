"""Every setting of a training run in one typed, validated object: :class:`TrainConfig`.

Each field carries its default, a one-line doc, its command-line flag and its check, so that
the command line (:func:`build_parser`), the YAML files a run writes and reads
(``OUT/config.yaml``, ``--config``), the checkpoints and the flag reference in
``docs/training.md`` (:func:`flag_reference`; ``python -m cgc.config --write docs/training.md``)
all come from one list. :meth:`TrainConfig.validate` checks the whole config once, before any
data or model is built, and reports every problem in one :class:`cgc.errors.ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingFile, UnknownName
from .transforms import CE_SCALE, DEFAULT_SCALE, SAMPLERS

#: the groups of the flag reference and of ``--help``, in order
GROUPS = ("data", "model", "optimization", "CGC", "distributed", "run")
LOSSES = ("cgc", "mse", "ce")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "off", "bf16")
NEGATIVES = ("global", "local")
PADDINGS = ("border", "zeros")
NORMS = ("batch", "group")


# ----------------------------------------------------------------------------- checks
Check = Callable[[Any], str | None]


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}"


def positive(v) -> str | None:
    return None if v is None or (math.isfinite(v) and v > 0) else "must be a finite number > 0"


def non_negative(v) -> str | None:
    return None if v is None or (math.isfinite(v) and v >= 0) else "must be a finite number >= 0"


def fraction(v) -> str | None:
    return None if v is None or 0 < v <= 1 else "must be in (0, 1]"


def unit_interval(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def area_range(v) -> str | None:
    low, high = v
    return None if 0 < low <= high <= 1 else "must be MIN MAX with 0 < MIN <= MAX <= 1"


def setting(
    default,
    doc: str,
    group: str,
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    check: Check | None = None,
    metavar=None,
):
    """A :class:`TrainConfig` field: its default, one-line doc, group, flag and check."""
    meta = dict(doc=doc, group=group, flag=flag, choices=choices, check=check, metavar=metavar)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of ``python -m cgc.train``; see each field's doc (``--help``,
    ``docs/training.md``). Build one directly, from flags (:func:`parse`) or from a YAML file
    (:meth:`load`), then :meth:`validate` it."""

    # data
    dataset: str = setting(
        "synthetic", "the dataset: synthetic is built in (no files), the others read --data ROOT", "data"
    )
    data: str | None = setting(None, "root folder of a file dataset", "data", metavar="ROOT")
    strict: bool = setting(False, "stop at the first unreadable image instead of skipping it", "data")
    samples_per_class: int | None = setting(
        None,
        "train on N images per class (class-balanced, fixed by --seed; list in OUT/train_files.txt)",
        "data",
        check=at_least(1),
        metavar="N",
    )
    train_fraction: float | None = setting(
        None,
        "train on a fraction F of each class (class-balanced, fixed by --seed)",
        "data",
        check=fraction,
        metavar="F",
    )
    unlabeled: str | None = setting(
        None,
        "a tree of images whose CGC term (target: the predicted class) is added to CE on the labeled set; "
        "'rest': the training images --samples-per-class/--train-fraction left out; 'all': every training image",
        "data",
        metavar="DIR",
    )
    unlabeled_batch_size: int | None = setting(
        None, "batch of unlabeled images (default: --batch-size)", "data", check=at_least(2)
    )
    image_size: int | None = setting(
        None, "input size in pixels (default: the dataset's, 64 built in, 224 files)", "data", check=at_least(8)
    )
    train_size: int = setting(6000, "built-in dataset: training images", "data", check=at_least(1))
    val_size: int = setting(1000, "built-in dataset: validation images", "data", check=at_least(1))
    num_classes: int = setting(10, "built-in dataset: number of shape classes (2-12)", "data", check=at_least(2))
    classes: tuple[str, ...] | None = setting(
        None,
        "built-in dataset: the shapes to classify, comma-separated (default: the first --num-classes)",
        "data",
        metavar="NAMES",
    )
    workers: int | None = setting(
        None, "data-loader worker processes (default: 0 for in-memory datasets, else 4)", "data", check=at_least(0)
    )
    # model
    arch: str = setting(
        "compact", "compact (a small CNN for CPUs), a torchvision classifier name, or timm:NAME", "model"
    )
    norm: str = setting("batch", "compact model: BatchNorm, or GroupNorm (no batch statistics)", "model", choices=NORMS)
    pretrained: bool = setting(False, "torchvision's / timm's ImageNet weights (needs the internet)", "model")
    weights: str | None = setting(
        None, "local weights to start from (.pth/.pt state dict, .safetensors, or a cgc checkpoint)", "model"
    )
    new_head: bool = setting(
        False, "with --weights: a fresh classifier head even when the weights' head has the right size", "model"
    )
    compact_stride: int = setting(
        8, "compact model: downsampling to the CAM layer (8: 8x8 heatmaps at 64 px; 4: 16x16)", "model", choices=(4, 8)
    )
    target_layer: str | None = setting(
        None, "CAM layer by dotted module name (default: found from the architecture)", "model"
    )
    cam: str = setting("gradcam", "CAM method of the CGC term and of the explanations", "model")
    # optimization
    optimizer: str = setting(
        "sgd", "sgd (with --momentum) or adamw (betas (momentum, 0.999))", "optimization", choices=OPTIMIZERS
    )
    epochs: int = setting(10, "training epochs", "optimization", check=at_least(1))
    batch_size: int = setting(
        32, "global batch: under torchrun each of N processes takes batch-size / N", "optimization", check=at_least(1)
    )
    lr: float = setting(0.05, "learning rate", "optimization", check=positive)
    head_lr: float | None = setting(
        None, "learning rate of the classifier head (default: --lr)", "optimization", check=positive
    )
    momentum: float = setting(0.9, "SGD momentum (AdamW's beta1)", "optimization", check=unit_interval)
    weight_decay: float = setting(
        5e-4, "weight decay (not on biases and norm parameters)", "optimization", check=non_negative
    )
    schedule: str = setting(
        "cosine",
        "cosine: per step to 0 at the end; step: x --lr-gamma every --lr-step epochs; constant",
        "optimization",
        choices=SCHEDULES,
    )
    lr_step: int = setting(30, "step schedule: epochs between decays", "optimization", check=at_least(1))
    lr_gamma: float = setting(0.1, "step schedule: factor of each decay", "optimization", check=fraction)
    warmup_epochs: float = setting(
        0.5, "linear warm-up of the learning rate from 0 to --lr over these epochs", "optimization", check=non_negative
    )
    # CGC
    loss: str = setting(
        "cgc", "cgc: CE + lambda InfoNCE; mse: CE + lambda MSE (no negatives); ce: CE only", "CGC", choices=LOSSES
    )
    lam: float = setting(1.0, "weight lambda of the CGC term", "CGC", flag="--lambda", check=non_negative)
    lambda_warmup_epochs: float = setting(
        3.0, "ramp lambda linearly from 0 over these epochs (0: full weight from the start)", "CGC", check=non_negative
    )
    temperature: float = setting(0.2, "InfoNCE temperature (the paper's ImageNet recipe: 0.5)", "CGC", check=positive)
    heatmap_size: int | None = setting(
        None, "resolution at which heatmaps are compared (default: the image size)", "CGC", check=at_least(2)
    )
    crop_scale: tuple[float, float] = setting(
        DEFAULT_SCALE, "area range of the augmented view's crop", "CGC", check=area_range, metavar=("MIN", "MAX")
    )
    crop_sampler: str = setting(
        "rrc",
        "where the augmented view's crops lie: rrc (RandomResizedCrop: inside the image, so the center is covered "
        "most often) or uniform (anywhere they overlap the image, every pixel covered equally often; the padding "
        "is left out of the comparison)",
        "CGC",
        choices=SAMPLERS,
    )
    class_negatives: int = setting(
        0,
        "K: the augmented image's heatmaps for its K most probable other classes join the InfoNCE negatives (0: none)",
        "CGC",
        check=at_least(0),
        metavar="K",
    )
    vflip: bool = setting(False, "flip the augmented view vertically too, with probability 0.5", "CGC")
    heatmap_padding: str = setting(
        "border", "what the heatmap warp sees beyond the original's edge", "CGC", choices=PADDINGS
    )
    ce_crop_scale: tuple[float, float] = setting(
        CE_SCALE,
        "area range of the cross-entropy view's crop (0.08 1 is the recipe)",
        "CGC",
        check=area_range,
        metavar=("MIN", "MAX"),
    )
    backend: str | None = setting(
        None, "ops backend: auto, reference, native, triton (default: $CGC_BACKEND or auto)", "CGC"
    )
    # distributed
    negatives: str = setting(
        "global",
        "InfoNCE negatives under torchrun: the whole global batch, or each process's own share (the authors')",
        "distributed",
        choices=NEGATIVES,
    )
    sync_bn: bool = setting(False, "SyncBatchNorm over the processes (CUDA only)", "distributed")
    # run
    seed: int = setting(0, "seed of the data, the crops, the initialization and the subsets", "run")
    device: str = setting("auto", "auto (CUDA when visible), cpu, cuda, cuda:1, ...", "run")
    amp: str = setting(
        "auto",
        "bf16: bfloat16 autocast (the CGC loss in float32); auto: bf16 where the device has fast bfloat16",
        "run",
        choices=AMP,
    )
    tensorboard: bool = setting(False, "also log to OUT/tensorboard (needs tensorboard)", "run")
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms: bit-identical reruns on GPUs", "run")
    out: str = setting("runs/cgc", "output folder", "run", metavar="DIR")
    resume: str | None = setting(
        None, "checkpoint or run folder to continue from; 'auto': OUT/last.pt if it exists", "run", metavar="PATH"
    )
    checkpoint_every: int = setting(
        0,
        "also write OUT/last.pt every N steps, mid-epoch (0: at epoch ends only)",
        "run",
        check=at_least(0),
        metavar="N",
    )
    overlays: int = setting(16, "validation images in overlays.png", "run", check=at_least(0), metavar="N")
    val_every: int = setting(1, "validate every K epochs and after the last", "run", check=at_least(1), metavar="K")

    # ------------------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """Plain values (tuples as lists): what ``config.yaml`` and the checkpoints hold."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> TrainConfig:
        """A config from plain values (a YAML file, a checkpoint); unknown keys and values of the
        wrong type are a :class:`ConfigError` naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise UnknownName("setting", key, known, hint=f"in {source}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], k, source) for k, v in values.items()})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A config from a YAML file (``OUT/config.yaml`` of a run, or one written by hand)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot read {path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
        return cls.from_dict(values, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the config as YAML (atomically): ``--config`` on it reruns the same run."""
        import yaml

        from .checkpoint import write_text_atomic

        header = "# python -m cgc.train --config THIS_FILE reruns this run; flags given with it override these\n"
        write_text_atomic(header + yaml.safe_dump(self.to_dict(), sort_keys=False), path)

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` (field names, as ``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------- checks
    def problems(self, *, world_size: int = 1, device_type: str | None = None) -> list[str]:
        """Everything wrong with this config, as flag-named messages (empty: it can run).
        ``world_size``: processes of the job; ``device_type``: where it runs (None: not known)."""
        found = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                found.append(f"{flag_of(f)} must be a finite number, got {value}")
                continue
            if meta["choices"] is not None and value not in meta["choices"]:
                found.append(f"{flag_of(f)} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            elif meta["check"] is not None and (why := meta["check"](value)):
                found.append(f"{flag_of(f)} {why}, got {_shown(value)}")
        found += self._relations(world_size, device_type)
        return found

    def _relations(self, world_size: int, device_type: str | None) -> list[str]:
        from . import data, ops
        from .cam_methods import CAM_METHODS

        found = []
        add = found.append
        cgc = self.loss != "ce"
        if self.dataset not in data.DATASETS:
            add(str(UnknownName("--dataset", self.dataset, data.DATASETS)))
        elif self.dataset == "synthetic":
            if self.classes is not None:
                try:
                    data.synthetic.class_names(classes=self.classes)
                except ConfigError as err:
                    add(f"--classes: {err}")
            elif self.num_classes > len(data.synthetic.CLASS_SHAPES):
                add(f"--num-classes must be in [2, {len(data.synthetic.CLASS_SHAPES)}], got {self.num_classes}")
            if self.train_size < self.batch_size and not (self.samples_per_class or self.train_fraction):
                add(f"--batch-size {self.batch_size} is larger than the {self.train_size} training images")
        else:
            layout = data.FILE_DATASETS[self.dataset][1]
            if self.data is None:
                add(f"--dataset {self.dataset} needs --data ROOT (the dataset's folder); expected layout:\n{layout}")
            elif not Path(self.data).is_dir():
                add(f"--data {self.data} is not a folder; expected layout of {self.dataset}:\n{layout}")
            if self.classes is not None:
                add(f"--classes picks shapes of the built-in dataset; {self.dataset} has the classes of its folders")
        if self.cam not in CAM_METHODS:
            add(str(UnknownName("CAM method (--cam)", self.cam, CAM_METHODS)))
        if self.samples_per_class is not None and self.train_fraction is not None:
            add("give --samples-per-class or --train-fraction, not both")
        if cgc and self.batch_size < 2:
            add("--batch-size must be >= 2 for the CGC term (the other images are the negatives)")
        if self.unlabeled is not None:
            if not cgc:
                add("--unlabeled needs a CGC term: use --loss cgc or mse")
            if self.unlabeled == "rest" and not (self.samples_per_class or self.train_fraction):
                add("--unlabeled rest needs --samples-per-class or --train-fraction (the rest of what?)")
            if self.unlabeled not in ("rest", "all") and not Path(self.unlabeled).is_dir():
                add(f"--unlabeled {self.unlabeled} is not a folder (or 'rest' / 'all')")
        if self.crop_sampler != "rrc" and not cgc:
            add(f"--crop-sampler {self.crop_sampler} places the CGC term's crops: use --loss cgc or mse")
        if self.class_negatives:
            if self.loss != "cgc":
                add("--class-negatives are InfoNCE negatives: use --loss cgc")
            classes = len(self.classes) if self.classes else self.num_classes
            if self.dataset == "synthetic" and self.class_negatives >= classes:
                add(
                    f"--class-negatives {self.class_negatives} needs more than {self.class_negatives} classes, got {classes}"
                )
        if self.new_head and not self.weights:
            add("--new-head goes with --weights")
        if self.pretrained and self.weights:
            add("use either --pretrained or --weights, not both")
        if self.weights and not Path(self.weights).is_file():
            add(f"--weights {self.weights}: no such file")
        if self.arch != "compact" and (self.norm != "batch" or self.compact_stride != 8):
            add(f"--norm and --compact-stride are options of the compact model; {self.arch} keeps its own")
        if self.arch == "compact" and self.image_size is not None and 8 <= self.image_size < 2 * self.compact_stride:
            add(
                f"--image-size {self.image_size} is too small for the compact model: its CAM layer is "
                f"{self.compact_stride}x smaller, and a heatmap needs at least 2x2 pixels "
                f"(use >= {2 * self.compact_stride})"
            )
        if self.resume not in (None, "auto"):
            path = Path(self.resume)
            if not (path.is_file() or (path / "last.pt").is_file()):
                add(f"--resume {self.resume}: no checkpoint there (a last.pt file or a run folder holding one)")
        if self.backend is not None:
            if self.backend not in ("auto", *ops.BACKENDS):
                add(f"--backend must be one of auto, {', '.join(ops.BACKENDS)}, got {self.backend!r}")
            elif self.backend != "auto":
                why = ops.unavailable(self.backend, device_type)
                if why:
                    add(f"--backend {self.backend}: {why}")
        for flag, size in (("--batch-size", self.batch_size), ("--unlabeled-batch-size", self.unlabeled_batch_size)):
            if size is not None and size % world_size:
                add(f"{flag} {size} is the global batch and must divide evenly over the {world_size} processes")
        local = min(self.batch_size, self.unlabeled_batch_size or self.batch_size) // world_size
        if self.loss == "cgc" and world_size > 1 and self.negatives == "local" and local < 2:
            add("--negatives local needs at least 2 images per process (the others are the negatives)")
        if self.sync_bn:
            if device_type is not None and device_type != "cuda":
                add(
                    "--sync-bn needs CUDA devices: SyncBatchNorm has no CPU kernel. On CPUs use --norm group "
                    "(the compact model), whose statistics do not depend on the batch split"
                )
            elif world_size < 2:
                add("--sync-bn needs more than one process (torchrun --nproc_per_node N)")
        return found

    def validate(self, *, world_size: int = 1, device_type: str | None = None) -> TrainConfig:
        """This config, or one :class:`ConfigError` listing every problem (see :meth:`problems`)."""
        found = self.problems(world_size=world_size, device_type=device_type)
        if found:
            raise ConfigError("; ".join(found))
        return self


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def _coerce(value, hint, name: str, source: str):
    """``value`` as the field's type (lists as tuples, ints as floats); a :class:`ConfigError`
    when it cannot be."""
    optional = _is_union(hint) and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} in {source} cannot be empty")
    base = _base_type(hint)
    if base is tuple:
        item = typing.get_args(next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint)[0]
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} in {source} must be a list, got {value!r}")
        return tuple(_coerce(v, item, name, source) for v in value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name} in {source} must be a {base.__name__}, got {value!r}")
    return value


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _base_type(hint) -> type:
    """``int`` for ``int | None``, ``tuple`` for ``tuple[float, float]``, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if _is_union(hint):
        return _base_type(args[0])
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def choices_of(field: dataclasses.Field) -> tuple | None:
    """The values a setting takes, when they form a list: its own, or a registry's (datasets,
    CAM methods: known when asked, so that registered additions count)."""
    if field.metadata["choices"] is not None:
        return field.metadata["choices"]
    if field.name == "dataset":
        from .data import DATASETS

        return DATASETS
    if field.name == "cam":
        from .cam_methods import CAM_METHODS

        return tuple(CAM_METHODS)
    return None


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


# ----------------------------------------------------------------------------- command line
def build_parser(prog: str = "python -m cgc.train", description: str | None = None) -> argparse.ArgumentParser:
    """The command line of :class:`TrainConfig`: one flag per field, grouped, with its doc,
    default and choices, plus ``--config FILE``. Flags not given are absent from the parsed
    namespace, so that a ``--config`` file's values stand unless a flag overrides them."""
    from .cli import ArgumentParser

    p = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings (e.g. a run's OUT/config.yaml); flags given with it override its values",
    )
    hints = typing.get_type_hints(TrainConfig)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta, base = f.metadata, _base_type(hints[f.name])
        kwargs: dict[str, Any] = dict(dest=f.name, help=f"{meta['doc']} (default: {_default_text(f.default)})")
        if base is bool:
            kwargs["action"] = "store_true"
        elif base is tuple:
            if f.name == "classes":
                kwargs["type"] = lambda s: tuple(n.strip() for n in s.split(",") if n.strip())
            else:
                kwargs.update(nargs=2, type=float)
        else:
            kwargs["type"] = base
        if choices_of(f) is not None:
            kwargs["choices"] = choices_of(f)
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        groups[meta["group"]].add_argument(flag_of(f), **kwargs)
    return p


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return _shown(value) if isinstance(value, tuple) else str(value)


def parse(argv: list[str] | None = None, *, prog: str = "python -m cgc.train") -> TrainConfig:
    """The config of a command line: ``--config FILE``'s values (or the defaults), then the
    flags given. Not yet validated."""
    ns = vars(build_parser(prog).parse_args(argv))
    path = ns.pop("config", None)
    base = TrainConfig.load(path) if path else TrainConfig()
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}
    return base.replace(**changes)


def expected_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), read before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------- reference
def flag_reference() -> str:
    """The flag reference as Markdown tables, one per group (docs/training.md holds it)."""
    lines = []
    for group in GROUPS:
        lines += [f"**{group}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(TrainConfig):
            if f.metadata["group"] != group:
                continue
            meta = f.metadata
            metavar = meta["metavar"]
            shown = flag_of(f)
            if metavar:
                shown += " " + (" ".join(metavar) if isinstance(metavar, tuple) else metavar)
            choices = f" ({' / '.join(map(str, choices_of(f)))})" if choices_of(f) else ""
            lines.append(f"| `{shown}` | {_default_text(f.default)} | {meta['doc']}{choices} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


REFERENCE_START = "<!-- flag reference: generated by `python -m cgc.config --write docs/training.md` -->"
REFERENCE_END = "<!-- end of flag reference -->"


def write_reference(path: str | Path) -> bool:
    """Replace the flag reference between the markers in ``path``; True if it changed."""
    path = Path(path)
    text = path.read_text()
    start, end = text.index(REFERENCE_START), text.index(REFERENCE_END)
    updated = text[: start + len(REFERENCE_START)] + "\n\n" + flag_reference() + "\n" + text[end:]
    if updated != text:
        path.write_text(updated)
    return updated != text


def main(argv=None) -> None:
    """``python -m cgc.config``: print the flag reference, or ``--write FILE`` it between the markers."""
    p = argparse.ArgumentParser(prog="python -m cgc.config", description=main.__doc__)
    p.add_argument("--write", metavar="FILE", help="update the reference inside FILE (docs/training.md)")
    args = p.parse_args(argv)
    if args.write:
        changed = write_reference(args.write)
        print(f"{args.write}: {'updated' if changed else 'already up to date'}", file=sys.stderr)
    else:
        print(flag_reference(), end="")


if __name__ == "__main__":
    main()
