"""Every setting of a training run in one typed, validated object: :class:`TrainConfig`.

Each field carries its default, a one-line doc, its command-line flag and its check
(:func:`cgc.settings.setting`), so that the command line, the YAML files a run writes and
reads (``OUT/config.yaml``, ``--config``), the checkpoints and the flag reference in
``docs/training.md`` all come from one list (:mod:`cgc.settings`). :meth:`TrainConfig.validate`
checks the whole config once, before any data or model is built, and reports every problem in
one :class:`cgc.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

from .data.synthetic import PLACEMENTS
from .errors import ConfigError
from .settings import Settings, area_range, at_least, fraction, non_negative, positive, setting, unit_interval
from .transforms import CE_SCALE, DEFAULT_SCALE, SAMPLERS

LOSSES = ("cgc", "mse", "ce")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "off", "bf16")
NEGATIVES = ("global", "local")
PADDINGS = ("border", "zeros")
NORMS = ("batch", "group")
CAM_TARGETS = ("predicted", "label")


def _datasets() -> tuple[str, ...]:
    from .data import DATASETS

    return tuple(DATASETS)


def _cam_methods() -> tuple[str, ...]:
    from .cam_methods import CAM_METHODS

    return tuple(CAM_METHODS)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Settings):
    """Every setting of ``python -m cgc.train``; see each field's doc (``--help``,
    ``docs/training.md``). Build one directly, from flags (:meth:`parse`) or from a YAML file
    (:meth:`load`), then :meth:`validate` it."""

    PROG: ClassVar[str] = "python -m cgc.train"
    DESCRIPTION: ClassVar[str] = "Train a classifier with the CGC term (or the CE / MSE baselines)."
    GROUPS: ClassVar[tuple[str, ...]] = ("data", "model", "optimization", "CGC", "distributed", "run")

    # data
    dataset: str = setting(
        "synthetic",
        "the dataset: synthetic is built in (no files), the others read --data ROOT",
        "data",
        choices=_datasets,
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
    placement: str = setting(
        "anywhere",
        "built-in dataset: where the class object lies: anywhere it fits, or centered as in photographs "
        "(centers within a few pixels of the image's)",
        "data",
        choices=PLACEMENTS,
    )
    workers: int | None = setting(
        None, "data-loader worker processes (default: 0 for in-memory datasets, else 4)", "data", check=at_least(0)
    )
    # model
    arch: str = setting(
        "compact",
        "compact (a small CNN for CPUs), a torchvision classifier name, timm:NAME, or hf:NAME_OR_PATH (a Hugging "
        "Face image classifier: hub name or save_pretrained folder)",
        "model",
    )
    norm: str = setting("batch", "compact model: BatchNorm, or GroupNorm (no batch statistics)", "model", choices=NORMS)
    pretrained: bool = setting(
        False,
        "torchvision's / timm's ImageNet weights (needs the internet); hf:: the folder's or the hub model's weights",
        "model",
    )
    weights: str | None = setting(
        None,
        "local weights to start from (.pth/.pt state dict, .safetensors, a cgc checkpoint, or a save_pretrained folder)",
        "model",
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
    cam: str = setting("gradcam", "CAM method of the CGC term and of the explanations", "model", choices=_cam_methods)
    # optimization
    optimizer: str = setting(
        "adamw", "adamw (betas (momentum, 0.999)) or sgd (with --momentum)", "optimization", choices=OPTIMIZERS
    )
    epochs: int = setting(10, "training epochs", "optimization", check=at_least(1))
    batch_size: int = setting(
        32, "global batch: under torchrun each of N processes takes batch-size / N", "optimization", check=at_least(1)
    )
    lr: float = setting(3e-3, "learning rate", "optimization", check=positive)
    head_lr: float | None = setting(
        None, "learning rate of the classifier head (default: --lr)", "optimization", check=positive
    )
    momentum: float = setting(0.9, "SGD momentum (AdamW's beta1)", "optimization", check=unit_interval)
    weight_decay: float = setting(
        0.05,
        "weight decay (not on biases and norm parameters; decoupled with adamw)",
        "optimization",
        check=non_negative,
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
    temperature: float = setting(0.5, "InfoNCE temperature (the paper's ImageNet recipe)", "CGC", check=positive)
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
    cam_target: str = setting(
        "label",
        "the class the CGC term's CAMs explain on labeled images: the one predicted on the original view (the "
        "paper's), or the label; unlabeled images always use the predicted one",
        "CGC",
        choices=CAM_TARGETS,
    )
    term_gate: float = setting(
        0.5,
        "cross-entropy first: the CGC term waits until the training top-1 (a moving average over about 50 steps) "
        "reaches this fraction, then --lambda-warmup-epochs ramp it in (0: on from the first step)",
        "CGC",
        check=unit_interval,
        metavar="TOP1",
    )
    detach_target: bool = setting(
        False,
        "stop the gradient through the warped original heatmap (the positive): only the augmented one moves",
        "CGC",
    )
    heatmap_floor: float = setting(
        0.0,
        "keeps the term well-conditioned on nearly empty heatmaps: every cell gets FLOOR times the heatmap's "
        "magnitude before its ReLU added before the comparison (0: the paper's term)",
        "CGC",
        check=non_negative,
        metavar="FLOOR",
    )
    grad_bound: float = setting(
        0.0,
        "an adaptive lambda: each step lambda becomes min(lambda, BOUND * |dCE/dA| / |dCGC/dA|), A the CAM "
        "layer's activations, so the term's gradient there never exceeds BOUND times cross-entropy's (0: off)",
        "CGC",
        check=non_negative,
        metavar="BOUND",
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

    # ------------------------------------------------------------------------- checks
    def relations(self, *, world_size: int = 1, device_type: str | None = None) -> list[str]:
        """Settings that cannot work together, as flag-named messages. ``world_size``:
        processes of the job; ``device_type``: where it runs (None: not known)."""
        return (
            self._data_problems()
            + self._term_problems()
            + self._model_problems()
            + self._job_problems(world_size, device_type)
        )

    def _data_problems(self) -> list[str]:
        from . import data

        found = []
        if self.dataset == "synthetic":
            if self.classes is not None:
                try:
                    data.synthetic.class_names(classes=self.classes)
                except ConfigError as err:
                    found.append(f"--classes: {err}")
            elif self.num_classes > len(data.synthetic.CLASS_SHAPES):
                found.append(
                    f"--num-classes must be in [2, {len(data.synthetic.CLASS_SHAPES)}], got {self.num_classes}"
                )
            if self.train_size < self.batch_size and not (self.samples_per_class or self.train_fraction):
                found.append(f"--batch-size {self.batch_size} is larger than the {self.train_size} training images")
        elif self.dataset in data.FILE_DATASETS:
            layout = data.FILE_DATASETS[self.dataset][1]
            if self.data is None:
                found.append(
                    f"--dataset {self.dataset} needs --data ROOT (the dataset's folder); expected layout:\n{layout}"
                )
            elif not Path(self.data).is_dir():
                found.append(f"--data {self.data} is not a folder; expected layout of {self.dataset}:\n{layout}")
            if self.classes is not None:
                found.append(
                    f"--classes picks shapes of the built-in dataset; {self.dataset} has the classes of its folders"
                )
        if self.samples_per_class is not None and self.train_fraction is not None:
            found.append("give --samples-per-class or --train-fraction, not both")
        if self.unlabeled is not None:
            if self.loss == "ce":
                found.append("--unlabeled needs a CGC term: use --loss cgc or mse")
            if self.unlabeled == "rest" and not (self.samples_per_class or self.train_fraction):
                found.append("--unlabeled rest needs --samples-per-class or --train-fraction (the rest of what?)")
            if self.unlabeled not in ("rest", "all") and not Path(self.unlabeled).is_dir():
                found.append(f"--unlabeled {self.unlabeled} is not a folder (or 'rest' / 'all')")
        return found

    def _term_problems(self) -> list[str]:
        found = []
        cgc = self.loss != "ce"
        if cgc and self.batch_size < 2:
            found.append("--batch-size must be >= 2 for the CGC term (the other images are the negatives)")
        if self.crop_sampler != "rrc" and not cgc:
            found.append(f"--crop-sampler {self.crop_sampler} places the CGC term's crops: use --loss cgc or mse")
        if self.class_negatives:
            if self.loss != "cgc":
                found.append("--class-negatives are InfoNCE negatives: use --loss cgc")
            classes = len(self.classes) if self.classes else self.num_classes
            if self.dataset == "synthetic" and self.class_negatives >= classes:
                found.append(
                    f"--class-negatives {self.class_negatives} needs more than {self.class_negatives} classes, got {classes}"
                )
        return found

    def _model_problems(self) -> list[str]:
        found = model_option_problems(
            self.arch, pretrained=self.pretrained, weights=self.weights, norm=self.norm, stride=self.compact_stride
        )
        if self.new_head and not self.weights:
            found.append("--new-head goes with --weights")
        if self.weights and not Path(self.weights).exists():
            found.append(f"--weights {self.weights}: no such file or folder")
        if self.arch == "compact" and self.image_size is not None and 8 <= self.image_size < 2 * self.compact_stride:
            found.append(
                f"--image-size {self.image_size} is too small for the compact model: its CAM layer is "
                f"{self.compact_stride}x smaller, and a heatmap needs at least 2x2 pixels "
                f"(use >= {2 * self.compact_stride})"
            )
        return found

    def _job_problems(self, world_size: int, device_type: str | None) -> list[str]:
        from . import ops

        found = []
        if self.resume not in (None, "auto"):
            path = Path(self.resume)
            if not (path.is_file() or (path / "last.pt").is_file()):
                found.append(
                    f"--resume {self.resume}: no checkpoint there (a last.pt file or a run folder holding one)"
                )
        if self.backend is not None:
            if self.backend not in ("auto", *ops.BACKENDS):
                found.append(f"--backend must be one of auto, {', '.join(ops.BACKENDS)}, got {self.backend!r}")
            elif self.backend != "auto" and (why := ops.unavailable(self.backend, device_type)):
                found.append(f"--backend {self.backend}: {why}")
        for flag, size in (("--batch-size", self.batch_size), ("--unlabeled-batch-size", self.unlabeled_batch_size)):
            if size is not None and size % world_size:
                found.append(
                    f"{flag} {size} is the global batch and must divide evenly over the {world_size} processes"
                )
        local = min(self.batch_size, self.unlabeled_batch_size or self.batch_size) // world_size
        if self.loss == "cgc" and world_size > 1 and self.negatives == "local" and local < 2:
            found.append("--negatives local needs at least 2 images per process (the others are the negatives)")
        if self.sync_bn:
            if device_type is not None and device_type != "cuda":
                found.append(
                    "--sync-bn needs CUDA devices: SyncBatchNorm has no CPU kernel. On CPUs use --norm group "
                    "(the compact model), whose statistics do not depend on the batch split"
                )
            elif world_size < 2:
                found.append("--sync-bn needs more than one process (torchrun --nproc_per_node N)")
        return found


def model_option_problems(arch: str, *, pretrained: bool, weights, norm: str, stride: int) -> list[str]:
    """What cannot work in these model options (of :class:`TrainConfig` and of
    :func:`cgc.models.build_model`), as flag-named messages."""
    found = []
    if pretrained and weights:
        found.append("use either --pretrained or --weights, not both")
    if arch != "compact" and (norm != "batch" or stride != 8):
        found.append(f"--norm and --compact-stride are options of the compact model; {arch} keeps its own")
    if arch == "compact" and pretrained:
        found.append("the compact model has no pretrained weights; use --weights PATH")
    if arch in ("hf:", "timm:"):
        found.append(f"--arch {arch} needs a name after the colon")
    return found


def parse(argv: list[str] | None = None) -> TrainConfig:
    """The config of ``python -m cgc.train``'s command line (not yet validated)."""
    return TrainConfig.parse(argv)


def expected_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), read before joining."""
    return int(os.environ.get("WORLD_SIZE", "1"))
