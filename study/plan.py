"""What the study runs: its parts, their configurations and seeds, and the settings of its
command line (:class:`StudyConfig`).

Every configuration is written out in full relative to :class:`cgc.train_config.TrainConfig`'s
defaults where it names a setting, so a table row means the same run whatever the default
becomes. Configurations compared in one part run on the same seeds: the same data, the same
initialization, the same data order and crops (all keyed by the seed), so their differences are
paired. The term's settings were chosen on the tuning seeds (:data:`TUNING_SEEDS`), whose data
no reported run uses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from typing import ClassVar

from cgc.settings import Settings, setting
from cgc.train_config import TrainConfig

#: the seeds of every reported comparison (data, initialization, order and crops)
REPORT_SEEDS = tuple(range(10))
#: the tuning split: seeds whose data (the built-in dataset is generated from the seed),
#: initializations and crops no reported run uses; the term's settings were chosen on them
TUNING_SEEDS = (100, 101, 102, 103, 104)
#: the seeds of the vision transformer's runs (each costs about ten CNN runs on a CPU)
TRANSFORMER_SEEDS = (0, 1, 2)
#: the seeds of the fine-tuning runs (cheap: 150 steps each)
FINETUNE_SEEDS = (0, 1, 2)

#: the default before the floor (T 0.5 behind the gate and the label's CAM, no floor): the tuning
#: seeds showed the term without a floor ill-conditioned where the term opens at the first step
NO_FLOOR = {"heatmap_floor": 0.0}
#: the temperature of the study's first configurations: the default until the tuning seeds and
#: seeds 0-9 showed T 0.5 behind the safeguards closer to the aim (docs/study.md); no floor then
T_BEFORE = {"temperature": 0.2, **NO_FLOOR}
#: the term without any safeguard: CAMs of the predicted class, no gate, gradients through both sides, no floor
UNGUARDED = {
    "term_gate": 0.0,
    "cam_target": "predicted",
    "detach_target": False,
    "grad_bound": 0.0,
    "heatmap_floor": 0.0,
    **T_BEFORE,
}
#: the safeguards of the T 0.5 default before the floor: the gate and the label's CAM
GATED = {**UNGUARDED, "term_gate": 0.5, "cam_target": "label", "temperature": 0.5}
#: the candidates for a term that is safe to turn on, screened on the tuning seeds against CE
TUNING: dict[str, dict] = {
    "ce": {"loss": "ce"},
    "cgc, no safeguard, T 0.2": UNGUARDED,
    "cgc, gate 0.5, T 0.2": {**UNGUARDED, "term_gate": 0.5},
    "cgc, label's CAM, T 0.2": {**UNGUARDED, "cam_target": "label"},
    "cgc, detached target, T 0.2": {**UNGUARDED, "detach_target": True},
    "cgc, gate 0.5 + label's CAM, T 0.2": {**UNGUARDED, "term_gate": 0.5, "cam_target": "label"},
    "cgc, gate 0.5 + label's CAM + detached target, T 0.2": {
        **UNGUARDED,
        "term_gate": 0.5,
        "cam_target": "label",
        "detach_target": True,
    },
    "cgc, no safeguard, T 0.5": {**UNGUARDED, "temperature": 0.5},
    "cgc, gate 0.5 + label's CAM, T 0.5": GATED,
    "cgc, gradient bound 1, T 0.2": {**UNGUARDED, "grad_bound": 1.0},
    "cgc, gate 0.5 + label's CAM, T 0.5, class negatives K=3": {**GATED, "class_negatives": 3},
    "cgc, gate 0.5 + label's CAM, T 0.5, floor 0.3": {**GATED, "heatmap_floor": 0.3},
    "cgc, gate 0.5 + label's CAM, T 0.5, floor 1": {**GATED, "heatmap_floor": 1.0},
}
#: the options a user can turn on, each on top of the default term
OPTIONS = {
    "lambda 2": {"lam": 2.0},
    "uniform crops": {"crop_sampler": "uniform"},
    "class negatives K=3": {"class_negatives": 3},
    "uniform crops + class negatives K=3": {"crop_sampler": "uniform", "class_negatives": 3},
}
#: the default term against CE, on the report seeds; the default before the floor and its options;
#: then the same at the temperature the default had before that
LOCALIZATION: dict[str, dict] = {
    "ce": {"loss": "ce"},
    "cgc": {},
    "cgc, no floor": NO_FLOOR,
    **{f"cgc, no floor, {name}": {**NO_FLOOR, **changes} for name, changes in OPTIONS.items()},
    "cgc, T 0.2": T_BEFORE,
    **{f"cgc, T 0.2, {name}": {**T_BEFORE, **changes} for name, changes in OPTIONS.items()},
}
#: the same comparison with objects near the image center, as in photographs
PLACEMENT: dict[str, dict] = {
    "ce, centered objects": {"loss": "ce", "placement": "centered"},
    "cgc, no floor, centered objects": {"placement": "centered", **NO_FLOOR},
    "cgc, T 0.2, centered objects": {"placement": "centered", **T_BEFORE},
}
#: the semi-supervised comparison (the first two are transfer runs: recorded again, not rerun)
SEMI: dict[str, dict] = {
    "ce, labeled only": {"loss": "ce"},
    "cgc, labeled only": {},
    "ce + cgc on the unlabeled rest": {"unlabeled": "rest"},
    "ce + cgc on all images, unlabeled": {"unlabeled": "all"},
}
PRETRAIN_SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond")
TARGET_SHAPES = ("star", "tee", "crescent", "cross", "semicircle", "hexagon")
#: the vision transformer's recipe: timm's small test ViT (6 blocks, width 64, class-token head;
#: patch 8 at 64 px: an 8x8 grid), AdamW as ViTs are trained, four of the shapes (ten do not get
#: off the ground in the epochs a CPU affords, see docs/transformers.md)
VIT = dict(
    arch="timm:test_vit",
    classes=("circle", "square", "triangle", "plus"),
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=1.0,
)
#: fine-tuning CE's ViT with the term: a lower learning rate, the full term from the first step
VIT_FINETUNING = {"lr": 3e-4, "warmup_epochs": 0.0, "term_gate": 0.0, "lambda_warmup_epochs": 0.0}
#: the ViT runs: CE and CGC from scratch, and CE's final weights fine-tuned with the term (the
#: names starting with "ce, then"); each CGC run also at the temperature the default had before
TRANSFORMERS: dict[str, dict] = {
    "ce": {"loss": "ce"},
    "cgc, no floor": NO_FLOOR,
    "ce, then cgc fine-tuning, no floor": {**VIT_FINETUNING, **NO_FLOOR},
    "cgc, T 0.2": T_BEFORE,
    "ce, then cgc fine-tuning, T 0.2": {**VIT_FINETUNING, **T_BEFORE},
}
#: fine-tuning CE's ViT: epochs of the term after CE's own
VIT_FINETUNE_EPOCHS = 3
PARTS = ("tuning", "tuning-finetune", "localization", "placement", "transfer", "semi", "transformers")
#: the optional package each part needs beyond cgc's own dependencies
PART_NEEDS = {"transformers": "timm"}
#: the part whose first configuration is the baseline the others are compared with
BASELINES = {"tuning": "ce", "localization": "ce", "placement": "ce, centered objects", "transformers": "ce"}


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the study's runs are (the full study, or ``--quick``)."""

    train_size: int = 6000
    val_size: int = 1000
    image_size: int = 64
    epochs: int = 10
    pool: int = 3000  # fine-tuning: training images of the target shapes (labeled + unlabeled)
    finetune_val: int = 600
    finetune_steps: int = 150
    shots: tuple[int, ...] = (5, 10, 20, 50)
    semi_shots: tuple[int, ...] = (5, 20)
    tuning_shots: tuple[int, ...] = (10, 50)
    tuning: tuple[str, ...] = tuple(TUNING)
    localization: tuple[str, ...] = tuple(LOCALIZATION)
    transformers: tuple[str, ...] = tuple(TRANSFORMERS)
    vit_epochs: int = 10


QUICK = Scale(
    train_size=128,
    val_size=48,
    image_size=32,
    epochs=1,
    pool=200,
    finetune_val=48,
    finetune_steps=4,
    shots=(2, 4),
    semi_shots=(2,),
    tuning_shots=(2,),
    tuning=("ce", "cgc, gate 0.5 + label's CAM, T 0.5"),
    localization=("ce", "cgc", "cgc, T 0.2", "cgc, no floor, uniform crops + class negatives K=3"),
    transformers=("ce", "cgc, no floor", "ce, then cgc fine-tuning, no floor"),
    vit_epochs=1,
)


@dataclasses.dataclass(frozen=True)
class StudyConfig(Settings):
    """What ``python -m study`` runs (see each field's doc)."""

    PROG: ClassVar[str] = "python -m study"
    DESCRIPTION: ClassVar[str] = "The runs behind docs/study.md, with seeds, tables and figures."
    GROUPS: ClassVar[tuple[str, ...]] = ("study",)

    out: str = setting("runs/study", "output folder (runs, study.json, tables.md, figures)", "study", metavar="DIR")
    parts: tuple[str, ...] = setting(PARTS, "the parts to run", "study", choices=PARTS, nargs="+")
    seeds: tuple[int, ...] = setting(
        REPORT_SEEDS, "seeds of the reported comparisons (localization, placement)", "study", nargs="+"
    )
    tuning_seeds: tuple[int, ...] = setting(
        TUNING_SEEDS, "seeds of the tuning split, on which the term's settings are chosen", "study", nargs="+"
    )
    finetune_seeds: tuple[int, ...] = setting(
        FINETUNE_SEEDS, "seeds of the fine-tuning runs (limited and unlabeled data)", "study", nargs="+"
    )
    transformer_seeds: tuple[int, ...] = setting(
        TRANSFORMER_SEEDS, "seeds of the vision transformer's runs", "study", nargs="+"
    )
    configurations: tuple[str, ...] = setting(
        (),
        "run only the configurations of these names (and the runs they start from); default: all of them",
        "study",
        nargs="+",
        metavar="NAME",
    )
    quick: bool = setting(
        False,
        "a miniature of the whole study: tiny runs, the first two of each list of seeds (about two minutes; CI)",
        "study",
    )

    def relations(self) -> list[str]:
        found = []
        for flag, seeds in (
            ("--seeds", self.seeds),
            ("--tuning-seeds", self.tuning_seeds),
            ("--finetune-seeds", self.finetune_seeds),
            ("--transformer-seeds", self.transformer_seeds),
        ):
            if len(seeds) < 2:
                found.append(f"give at least two {flag}: one seed cannot tell an effect from noise")
        tables = (TUNING, LOCALIZATION, PLACEMENT, TRANSFORMERS, SEMI, TRANSFER, FINETUNING_CANDIDATES)
        known = {n for table in tables for n in table}
        unknown = [n for n in self.configurations if n not in known]
        if unknown:
            found.append(f"--configurations: no configuration named {', '.join(map(repr, unknown))}")
        if set(self.tuning_seeds) & set(self.seeds):
            found.append("--tuning-seeds and --seeds must differ: settings chosen on a split are not reported on it")
        return found

    def miniature(self) -> StudyConfig:
        """These settings with the first two of each list of seeds (``--quick``)."""
        lists = ("seeds", "tuning_seeds", "finetune_seeds", "transformer_seeds")
        return self.replace(**{name: getattr(self, name)[:2] for name in lists})


def runnable_parts(parts) -> tuple[list[str], list[str]]:
    """``(parts that can run here, one line per part skipped for a missing optional package)``."""
    kept, skipped = [], []
    for part in parts:
        package = PART_NEEDS.get(part)
        if package is not None and importlib.util.find_spec(package) is None:
            skipped.append(
                f"study: the {part} part is skipped: it needs the optional package {package!r} (pip install {package})"
            )
        else:
            kept.append(part)
    return kept, skipped


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of the study: its part, configuration name, seed and config; ``after``: the key
    of the run whose final weights it starts from (None: the config's own weights)."""

    part: str
    name: str
    seed: int
    config: TrainConfig
    after: str | None = None

    @property
    def key(self) -> str:
        return run_key(self.part, self.name, self.seed)


def planned_runs(scale: Scale, parts, study: StudyConfig) -> list[PlannedRun]:
    """Every run of ``parts`` (only the ``study.configurations`` if it names any, with the runs
    they start from), those another run starts from first."""
    runs = _all_runs(scale, parts, study)
    if not study.configurations:
        return runs
    chosen = [r for r in runs if _configuration_of(r) in study.configurations]
    keep = {r.key for r in chosen} | {r.after for r in chosen}
    return [r for r in runs if r.key in keep]


def _configuration_of(run: PlannedRun) -> str:
    """A run's configuration name without the fine-tuning runs' ``, N/class``."""
    return run.name.rsplit(", ", 1)[0] if run.name.endswith("/class") else run.name


def _all_runs(scale: Scale, parts, study: StudyConfig) -> list[PlannedRun]:
    base = TrainConfig().replace(
        train_size=scale.train_size, val_size=scale.val_size, image_size=scale.image_size, epochs=scale.epochs
    )
    runs: list[PlannedRun] = []
    for part, names, table, seeds in (
        ("tuning", scale.tuning, TUNING, study.tuning_seeds),
        ("localization", scale.localization, LOCALIZATION, study.seeds),
        ("placement", tuple(PLACEMENT), PLACEMENT, study.seeds),
    ):
        if part in parts:
            runs += [PlannedRun(part, n, s, base.replace(seed=s, **table[n])) for n in names for s in seeds]
    if "transformers" in parts:
        vit = base.replace(epochs=scale.vit_epochs, **VIT)
        runs += _transformer_runs(vit, scale.transformers, study.transformer_seeds)
    if {"transfer", "semi", "tuning-finetune"} & set(parts):
        runs.append(PlannedRun("pretrain", "ce on six other shapes", 100, base.replace(seed=100, **PRETRAIN)))
    for part, shots, variants, seeds in (
        ("tuning-finetune", scale.tuning_shots, {"ce": TRANSFER["ce"], **FINETUNING_CANDIDATES}, study.tuning_seeds),
        ("transfer", scale.shots, TRANSFER, study.finetune_seeds),
        ("semi", scale.semi_shots, SEMI, study.finetune_seeds),
    ):
        if part in parts:
            runs += _finetune_runs(part, base, scale, shots, variants, seeds)
    return runs


PRETRAIN = {"loss": "ce", "classes": PRETRAIN_SHAPES}
TRANSFER = {"ce": {"loss": "ce"}, "cgc": {}}
#: the term's floor and gate when fine-tuning opens the term at step 0 (measured on tuning seeds)
FINETUNING_CANDIDATES = {
    "cgc, no floor": {"heatmap_floor": 0.0},
    "cgc, floor 0.3": {"heatmap_floor": 0.3},
    "cgc, floor 1": {"heatmap_floor": 1.0},
    "cgc, floor 0.3, gate 0.5": {"heatmap_floor": 0.3, "term_gate": 0.5},
}


def _transformer_runs(vit: TrainConfig, names, seeds) -> list[PlannedRun]:
    """The ViT runs of ``names`` (CE's always: the fine-tuning ones start from the same seed's)."""
    runs = []
    for seed in seeds:
        ce = PlannedRun("transformers", "ce", seed, vit.replace(seed=seed, **TRANSFORMERS["ce"]))
        runs.append(ce)
        for name in names:
            if name == "ce":
                continue
            if name.startswith("ce, then"):
                tuned = vit.replace(seed=seed, epochs=VIT_FINETUNE_EPOCHS, **TRANSFORMERS[name])
                runs.append(PlannedRun("transformers", name, seed, tuned, after=ce.key))
            else:
                runs.append(PlannedRun("transformers", name, seed, vit.replace(seed=seed, **TRANSFORMERS[name])))
    return runs


def _finetune_runs(part: str, base: TrainConfig, scale: Scale, shots, variants: dict, seeds) -> list[PlannedRun]:
    """A compact model pretrained (CE, the default recipe) on six shapes, fine-tuned with a new
    head on six others from ``n`` images per class for 150 steps of SGD."""
    pretrained = run_key("pretrain", "ce on six other shapes", 100)
    runs = []
    for n in shots:
        images = 6 * n
        batch = min(32, images - images % 2)
        epochs = math.ceil(scale.finetune_steps / (images // batch))
        finetune = base.replace(
            train_size=scale.pool,
            val_size=scale.finetune_val,
            classes=TARGET_SHAPES,
            new_head=True,
            samples_per_class=n,
            batch_size=batch,
            epochs=epochs,
            val_every=max(1, epochs // 3),
            optimizer="sgd",  # fine-tuning a pretrained model: SGD with momentum, as the paper's recipes
            lr=0.01,
            weight_decay=5e-4,
            lambda_warmup_epochs=0.0,
            term_gate=0.0,  # the pretrained model predicts from the start
            unlabeled_batch_size=32,
        )
        for name, changes in variants.items():
            runs += [
                PlannedRun(part, f"{name}, {n}/class", s, finetune.replace(seed=s, **changes), after=pretrained)
                for s in seeds
            ]
    return runs


#: settings added after study folders were recorded, with the value that does what runs
#: without them did: left out of a run's identity at that value, so those runs are not redone
ADDED_LATER = {"grad_bound": 0.0, "heatmap_floor": 0.0, "crop_ratio": [0.75, 4 / 3], "flip_p": 0.5}


def identity(config: TrainConfig, after: str | None = None) -> str:
    """What makes two planned runs the same run (everything but where they write)."""
    values = config.flat()
    for name, (_, field, _) in TrainConfig.leaves().items():
        for old in field.metadata["aliases"][:1]:  # the name recorded runs knew it by
            values[old] = values.pop(name)
    for where in ("out", "weights"):
        values.pop(where)
    for name, neutral in ADDED_LATER.items():
        if values.get(name) == neutral:
            values.pop(name)
    return json.dumps({**values, "after": after}, sort_keys=True)


def run_key(part: str, name: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"{part}/{safe}/seed{seed}"
