"""``python -m cgc.study``: the runs behind docs/study.md ("Does it work?"), with seeds and figures.

Three claims of the paper, tested on the built-in dataset with ``python -m cgc.train`` itself,
and the method carried to a vision transformer:

1. **explanations** (``localization``): CE vs CGC with the default recipe, and CGC with one
   setting changed at a time (heatmap resolution, crop scale, temperature, lambda and its ramp,
   the size the heatmaps are compared at, vertical flips, the CAM method, the warp's padding,
   the MSE ablation, uniform crops, class negatives): top-1, consistency, content heatmap,
   pointing game, random logit, MPRT and where the heatmaps sit in the object's box;
2. **limited data** (``transfer``): a compact model pretrained (CE) on six shapes, fine-tuned
   with a new head on six other shapes from N images per class, CE vs CGC;
3. **unlabeled data** (``semi``): the same fine-tuning from N labeled images per class, CE on
   them alone vs CE plus the CGC term on unlabeled images: the rest of the training images, or all
   of them (the labeled ones too, as the paper's recipe);
4. **transformers** (``transformers``): timm's small test ViT on four of the shapes, CE vs CGC.

Every run is a call of :func:`cgc.train.main` (its log under ``OUT/runs/``), recorded in
``OUT/study.json`` as it finishes, so an interrupted study continues where it stopped. At the
end: ``OUT/tables.md`` (every configuration, mean ± std over its seeds) and the figures
(``localization.png``, ``profiles.png``, ``coverage.png``, ``transfer.png``, ``semi.png``,
``transformers.png``). ``--quick`` runs a miniature of every part in about a minute (CI checks
that the study runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from . import cli, data, metrics, tables, train, viz
from .cam import CAM, resize_heatmaps
from .config import TrainConfig
from .models import LoadedModel, load_model
from .settings import Settings, setting

PRETRAIN_SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond")
TARGET_SHAPES = ("star", "tee", "crescent", "cross", "semicircle", "hexagon")
#: one setting changed at a time from the default recipe (the first two are the comparison)
LOCALIZATION: dict[str, dict] = {
    "ce": {"loss": "ce"},
    "cgc": {},
    "ce, stride 4": {"loss": "ce", "compact_stride": 4},
    "cgc, stride 4 (16x16 heatmaps)": {"compact_stride": 4},
    "cgc, crop scale 0.25-1": {"crop_scale": (0.25, 1.0)},
    "cgc, crop scale 0.5-1": {"crop_scale": (0.5, 1.0)},
    "cgc, T 0.1": {"temperature": 0.1},
    "cgc, T 0.3": {"temperature": 0.3},
    "cgc, T 0.5": {"temperature": 0.5},
    "cgc, T 0.5, lambda 2": {"temperature": 0.5, "lam": 2.0},
    "cgc, lambda 0.5": {"lam": 0.5},
    "cgc, lambda 2": {"lam": 2.0},
    "cgc, no lambda ramp": {"lambda_warmup_epochs": 0.0},
    "cgc, heatmaps compared at 8x8": {"heatmap_size": 8},
    "cgc, vertical flips too": {"vflip": True},
    "cgc, HiResCAM": {"cam": "hirescam"},
    "cgc, zero padding": {"heatmap_padding": "zeros"},
    "mse (no negatives)": {"loss": "mse"},
    "cgc, uniform crops": {"crop_sampler": "uniform"},
    "cgc, uniform crops, T 0.5": {"crop_sampler": "uniform", "temperature": 0.5},
    "cgc, class negatives K=1": {"class_negatives": 1},
    "cgc, class negatives K=3": {"class_negatives": 3},
    "cgc, uniform crops + class negatives K=3": {"crop_sampler": "uniform", "class_negatives": 3},
    "cgc, uniform crops + class negatives K=3, T 0.5": {
        "crop_sampler": "uniform",
        "class_negatives": 3,
        "temperature": 0.5,
    },
}
CORE = ("ce", "cgc")
#: the two options against the center pull and the loss of class-specificity, alone and
#: together: compared with CE and CGC over every seed
OPTIONS = tuple(name for name in LOCALIZATION if "uniform crops" in name or "class negatives" in name)
#: the options shown in the figures next to CE and CGC (both together at T 0.5: at T 0.2 they
#: kept every seed on the initial plateau, whose heatmaps say nothing about the options)
FIGURE_OPTIONS = (
    "cgc, uniform crops",
    "cgc, class negatives K=3",
    "cgc, uniform crops + class negatives K=3",
    "cgc, uniform crops + class negatives K=3, T 0.5",
)
#: the semi-supervised comparison (the first two are transfer runs: recorded again, not rerun)
SEMI: dict[str, dict] = {
    "ce, labeled only": {"loss": "ce"},
    "cgc, labeled only": {},
    "ce + cgc on the unlabeled rest": {"unlabeled": "rest"},
    "ce + cgc on all images, unlabeled": {"unlabeled": "all"},
}
#: what the localization study reports, in this order
REPORTED = ("val_top1", *metrics.TRAINING_METRICS)
#: measured again on every localization run's final weights with one protocol (the evaluation's
#: crops 0.08-1 for consistency, whatever the run trained with), and the sanity checks
EVALUATED = (*metrics.TRAINING_METRICS, "sparseness", "random_logit", "mprt")
#: where the heatmaps sit relative to the objects (:func:`box_geometry`)
GEOMETRY = ("offset_corr_y", "offset_corr_x", "peaks_off_center")
#: the parts whose runs' explanations are measured again on their final weights
EXPLAINED = ("localization", "transformers")


@dataclass(frozen=True)
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
    configs: tuple[str, ...] = tuple(LOCALIZATION)
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
    configs=("ce", "cgc", "cgc, T 0.5", "cgc, uniform crops + class negatives K=3"),
    vit_epochs=1,
)
#: the vision transformer's recipe (the ``transformers`` part): timm's small test ViT (6 blocks,
#: width 64, class-token head; patch 8 at 64 px: an 8x8 grid), AdamW as ViTs are trained, four
#: of the shapes (ten did not get off the ground in the epochs a CPU affords, see docs/transformers.md)
VIT = dict(
    arch="timm:test_vit",
    classes=("circle", "square", "triangle", "plus"),
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    warmup_epochs=1.0,
)
PARTS = ("localization", "transfer", "semi", "transformers")
#: the optional package each part needs beyond cgc's own dependencies
PART_NEEDS = {"transformers": "timm"}


def runnable_parts(parts) -> tuple[list[str], list[str]]:
    """``(parts that can run here, one line per part skipped for a missing optional package)``."""
    import importlib.util

    kept, skipped = [], []
    for part in parts:
        package = PART_NEEDS.get(part)
        if package is not None and importlib.util.find_spec(package) is None:
            skipped.append(
                f"cgc.study: the {part} part is skipped: it needs the optional package {package!r} (pip install {package})"
            )
        else:
            kept.append(part)
    return kept, skipped


@dataclasses.dataclass(frozen=True)
class StudyConfig(Settings):
    """What ``python -m cgc.study`` runs (see each field's doc)."""

    PROG: ClassVar[str] = "python -m cgc.study"
    DESCRIPTION: ClassVar[str] = "The runs behind docs/study.md, with seeds, tables and figures."
    GROUPS: ClassVar[tuple[str, ...]] = ("study",)

    out: str = setting("runs/study", "output folder (runs, study.json, tables.md, figures)", "study", metavar="DIR")
    parts: tuple[str, ...] = setting(PARTS, "the parts to run", "study", choices=PARTS, nargs="+")
    seeds: tuple[int, ...] = setting(
        (0, 1, 2), "seeds of the compared runs (CE and CGC, and every fine-tuning run)", "study", nargs="+"
    )
    screen_seeds: tuple[int, ...] | None = setting(
        None, "seeds of the localization variants (default: --seeds)", "study", nargs="+"
    )
    transformer_seeds: tuple[int, ...] | None = setting(
        None,
        "seeds of the vision transformer's runs (default: --seeds; each costs about ten CNN runs on a CPU)",
        "study",
        nargs="+",
    )
    confirm: tuple[str, ...] = setting(
        (),
        "localization variants to run with every --seed after screening (docs/study.md: the candidates)",
        "study",
        choices=tuple(LOCALIZATION),
        nargs="+",
        metavar="CONFIG",
    )
    quick: bool = setting(False, "a miniature of the whole study (about a minute; CI)", "study")

    def relations(self) -> list[str]:
        return [
            f"give at least two {flag}: one seed cannot tell an effect from noise"
            for flag, seeds in (("--seeds", self.seeds), ("--transformer-seeds", self.transformer_seeds))
            if seeds is not None and len(seeds) < 2
        ]


def plan(
    scale: Scale, parts, seeds, screen_seeds, confirm=(), transformer_seeds=None
) -> list[tuple[str, str, int, TrainConfig]]:
    """Every run: ``(part, configuration, seed, config)``; the pretraining run first.
    The localization variants run with ``screen_seeds``, the comparison (and ``confirm``) with
    ``seeds``, the vision transformer with ``transformer_seeds`` (default: ``seeds``). The
    fine-tuning configs get their ``weights`` (the pretraining run's) when they run."""
    base = TrainConfig(
        train_size=scale.train_size, val_size=scale.val_size, image_size=scale.image_size, epochs=scale.epochs
    )
    runs = []
    if "localization" in parts:
        for name in scale.configs:
            full = name in CORE or name in OPTIONS or name in confirm or screen_seeds is None
            for seed in seeds if full else screen_seeds:
                runs.append(("localization", name, seed, base.replace(seed=seed, **LOCALIZATION[name])))
    if "transformers" in parts:
        vit = base.replace(epochs=scale.vit_epochs, **VIT)
        for name, changes in (("ce", {"loss": "ce"}), ("cgc", {})):
            for seed in transformer_seeds or seeds:
                runs.append(("transformers", name, seed, vit.replace(seed=seed, **changes)))
    if "transfer" in parts or "semi" in parts:
        pretrain = base.replace(seed=100, loss="ce", classes=PRETRAIN_SHAPES)
        runs.append(("pretrain", "ce on six other shapes", 100, pretrain))
    for part, shots, variants in (
        ("transfer", scale.shots, {"ce": {"loss": "ce"}, "cgc": {}}),
        ("semi", scale.semi_shots, SEMI),
    ):
        if part not in parts:
            continue
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
                lr=0.01,
                lambda_warmup_epochs=0.0,
                unlabeled_batch_size=32,
            )
            for name, changes in variants.items():
                for seed in seeds:
                    runs.append((part, f"{name}, {n}/class", seed, finetune.replace(seed=seed, **changes)))
    return runs


def identity(config: TrainConfig) -> str:
    """What makes two planned runs the same run (everything but where they write)."""
    values = config.to_dict()
    for where in ("out", "weights"):
        values.pop(where)
    return json.dumps(values, sort_keys=True)


def run_key(part: str, name: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return f"{part}/{safe}/seed{seed}"


@contextlib.contextmanager
def log_to(path: Path):
    """While the block runs, the library's log (progress lines included) goes to ``path``
    only."""
    logger = logging.getLogger("cgc")
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(message)s"))
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(before[0])
        logger.propagate = before[1]


def execute(out: Path, runs, record: dict) -> None:
    """Each run not yet in ``record`` (study.json), one after another, quietly: its log goes to
    its folder's train.log, one line per run to the terminal."""
    pretrained = out / "runs" / run_key("pretrain", "ce on six other shapes", 100) / "best.pt"
    done = {r["identity"]: r for r in record["runs"].values()}
    for i, (part, name, seed, config) in enumerate(runs, 1):
        key = run_key(part, name, seed)
        if key in record["runs"]:
            continue
        same = identity(config)
        if same in done:  # the same run under another name (CE fine-tuning is in two claims)
            record["runs"][key] = {**done[same], "part": part, "name": name}
            continue
        folder = out / "runs" / key
        folder.mkdir(parents=True, exist_ok=True)
        weights = str(pretrained) if part in ("transfer", "semi") else None
        config = config.replace(out=str(folder), weights=weights)
        t0 = time.time()
        with log_to(folder / "train.log"):
            results = train.run(config)
        record["runs"][key] = done[same] = {
            "part": part,
            "name": name,
            "seed": seed,
            "identity": same,
            "config": config.to_dict(),
            "results": results,
        }
        if part in EXPLAINED:
            record["runs"][key]["evaluation"] = evaluate_run(folder)
        (out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
        shown = ", ".join(f"{k} {results[k]:.3f}" for k in REPORTED if isinstance(results.get(k), float))
        print(f"[{i}/{len(runs)}] {key}: {shown} ({time.time() - t0:.0f} s)", flush=True)


@dataclasses.dataclass
class TrainedRun:
    """A finished run opened for explaining: its model (eval mode) and validation data, and a
    CAM with the run's method and layer."""

    loaded: LoadedModel
    bundle: data.DataBundle
    cam: CAM


@contextlib.contextmanager
def open_run(folder: Path):
    """The :class:`TrainedRun` of a run folder's ``last.pt`` (its CAM closed on leaving)."""
    loaded = load_model(checkpoint_path=folder)
    bundle = data.build_for_run(loaded.train_args, {"train_size": 1})
    with CAM(loaded.model.eval(), loaded.target_layer, method=loaded.method) as cam:
        yield TrainedRun(loaded, bundle, cam)


def evaluate_run(folder: Path) -> dict:
    """:data:`EVALUATED` on a run's final weights (``last.pt``), the evaluation's defaults, and
    where its heatmaps sit in the objects' boxes (:data:`GEOMETRY`, :func:`box_geometry`)."""
    with open_run(folder) as run:
        out = metrics.explanation_metrics(run.cam, run.bundle.val, "cpu", metrics=metrics.select(list(EVALUATED)))
    geometry = box_geometry(folder)
    return {k: out[k] for k in (*EVALUATED, "mprt_steps")} | {k: geometry[k] for k in GEOMETRY}


def summarize(record: dict) -> dict:
    """``{part: {configuration: {metric: (mean, std, n)}}}`` over the seeds, and under
    ``"top1_by_seed"`` each seed's top-1 in seed order (a run stuck on a plateau shows there)."""
    grouped: dict = {}
    for run in sorted(record["runs"].values(), key=lambda run: run["seed"]):
        slot = grouped.setdefault(run["part"], {}).setdefault(run["name"], {})
        for k, v in {**run["results"], **run.get("evaluation", {})}.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                slot.setdefault(k, []).append(float(v))
    return {
        part: {
            name: {
                **{
                    k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for k, v in values.items()
                },
                "top1_by_seed": tuple(values["val_top1"]),
            }
            for name, values in configs.items()
        }
        for part, configs in grouped.items()
    }


def _cell(stats, key, scale=1.0, digits=3) -> str:
    if key not in stats:
        return "—"
    mean, std, n = stats[key]
    if n == 1:  # the table's seeds column says so
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _shots_then_variant(part: str, name: str) -> tuple[int, int]:
    """Sort key of a fine-tuning configuration ``"<variant>, <N>/class"``: by N, then as planned."""
    variant, shots = name.rsplit(", ", 1)
    order = list(SEMI if part == "semi" else ("ce", "cgc"))
    return int(shots.split("/")[0]), order.index(variant) if variant in order else len(order)


#: the columns of the study's tables: (report key, header, digits)
LOCALIZATION_COLUMNS = (
    ("val_top1", "val top-1 (%)", 1),
    ("consistency", "consistency (cosine) ↑", 3),
    ("consistency_iou", "consistency (top-20 % IoU) ↑", 3),
    ("content_heatmap", "content heatmap (%) ↑", 1),
    ("pointing_game", "pointing game (%) ↑", 1),
    ("sparseness", "sparseness ↑", 3),
    ("random_logit", "random logit ↓", 3),
    ("mprt", "MPRT ↓", 3),
    ("offset_corr_y", "offset corr. y", 2),
    ("offset_corr_x", "offset corr. x", 2),
    ("peaks_off_center", "peaks off center (%)", 0),
)
FINETUNE_COLUMNS = (
    ("val_top1", "val top-1 (%)", 1),
    ("content_heatmap", "content heatmap (%) ↑", 1),
    ("consistency", "consistency (cosine) ↑", 3),
)


def _table(configs: list[tuple[str, dict]], columns, by_seed: bool = False) -> str:
    """One row per configuration; ``by_seed`` adds each seed's top-1 after the mean."""
    rows = []
    for name, stats in configs:
        cells = [_cell(stats, k, digits=d) for k, _, d in columns]
        if by_seed:
            cells.insert(1, " / ".join(f"{v:.1f}" for v in stats["top1_by_seed"]))
        rows.append([name, stats["val_top1"][2], *cells])
    headers = [header for _, header, _ in columns]
    if by_seed:
        headers.insert(1, "top-1 by seed")
    return tables.markdown(["configuration", "seeds", *headers], rows)


def report(summary: dict) -> str:
    """Markdown tables of every configuration (mean ± std over its seeds)."""
    lines = [
        "## python -m cgc.study",
        "",
        "Every configuration run, mean ± std over its seeds (the seeds column). The explanation metrics of",
        "the localization runs are measured on each run's final weights with one protocol (crops of 8-100 %",
        "of the image for consistency, whatever the run trained with). docs/study.md reads these tables;",
        "study.json holds every run's config and results.",
        "",
    ]
    if "localization" in summary:
        lines += ["### Explanations (built-in dataset, default recipe unless stated)", ""]
        lines += [_table(list(summary["localization"].items()), LOCALIZATION_COLUMNS, by_seed=True), ""]
    if "transformers" in summary:
        recipe = ", ".join(f"{k} {'/'.join(v) if isinstance(v, tuple) else v}" for k, v in VIT.items())
        lines += ["### A vision transformer, CE vs CGC", "", f"Recipe: {recipe}; the rest as the default.", ""]
        lines += [_table(list(summary["transformers"].items()), LOCALIZATION_COLUMNS, by_seed=True), ""]
    for part, title in (
        ("transfer", "Limited data: fine-tuning on six new shapes"),
        ("semi", "Unlabeled data: N labeled images per class, the other training images unlabeled"),
    ):
        if part in summary:
            ordered = sorted(summary[part].items(), key=lambda item, part=part: _shots_then_variant(part, item[0]))
            lines += [f"### {title}", "", _table(ordered, FINETUNE_COLUMNS), ""]
    return "\n".join(lines)


def figures(out: Path, summary: dict) -> list[Path]:
    """One figure per claim: the localization and consistency bars, accuracy against images
    per class, and the semi-supervised comparison (error bars: std over seeds)."""
    written = []
    if "localization" in summary:
        written.append(localization_figure(out / "localization.png", summary["localization"]))
    for part, title, labels in (
        ("transfer", "fine-tuning on six new shapes", ("ce", "cgc")),
        ("semi", "N labeled images per class, the other images unlabeled", tuple(SEMI)),
    ):
        if part in summary:
            written.append(shots_figure(out / f"{part}.png", summary[part], title, labels))
    return written


def localization_figure(path: Path, loc: dict) -> Path:
    """Bars of top-1 and the explanation measures of CE, CGC and the figure's options."""
    shown = [n for n in (*CORE, *FIGURE_OPTIONS) if n in loc]
    # (key, label, scale, flipped: plotted as 1 - value so that higher is better everywhere)
    keys = [
        ("val_top1", "top-1", 0.01, False),
        ("consistency", "consistency\n(cosine)", 1, False),
        ("consistency_iou", "consistency\n(top-20% IoU)", 1, False),
        ("content_heatmap", "content\nheatmap", 0.01, False),
        ("pointing_game", "pointing\ngame", 0.01, False),
        ("random_logit", "class-specific\n(1 - random logit)", 1, True),
    ]
    keys = [k for k in keys if all(k[0] in loc[n] for n in shown)]
    fig = viz.figure(max(7.5, 1.6 * len(keys) + 0.3 * len(shown) * len(keys)), 3.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(shown))
    for j, name in enumerate(shown):
        stats = loc[name]
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(
            xs,
            [(1 - stats[k][0] * s) if flip else stats[k][0] * s for k, _, s, flip in keys],
            width,
            yerr=[stats[k][1] * s for k, _, s, _ in keys],
            label=f"{name} ({stats['val_top1'][2]} seeds)",
            capsize=2,
            color=f"C{j}",
        )
    ax.set_xticks(range(len(keys)), [label for _, label, _, _ in keys], fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("fraction (higher is better)")
    ax.set_title("CE vs CGC on the built-in dataset (mean ± std over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=min(3, len(shown)), frameon=False)
    fig.savefig(path)
    return path


def shots_figure(path: Path, configs: dict, title: str, labels) -> Path:
    """Val top-1 against labeled images per class, one line per variant."""
    fig = viz.figure(5.5, 3.6)
    ax = fig.subplots()
    for j, label in enumerate(labels):
        points = sorted(
            (int(name.rsplit(", ", 1)[1].split("/")[0]), stats["val_top1"])
            for name, stats in configs.items()
            if name.rsplit(", ", 1)[0] == label
        )
        if points:  # each series a little to the right of the last, so that the error bars do not overlap
            ax.errorbar(
                [n * 1.04**j for n, _ in points],
                [s[0] for _, s in points],
                yerr=[s[1] for _, s in points],
                marker="o",
                capsize=3,
                label=label,
                color=f"C{j}",
            )
    ax.set_xscale("log")
    ax.minorticks_off()
    shots = sorted({int(name.rsplit(", ", 1)[1].split("/")[0]) for name in configs})
    ax.set_xticks(shots, [str(n) for n in shots])
    ax.set_xlabel("labeled images per class")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def box_geometry(run_dir: Path, grid: int = 33) -> dict:
    """Where a trained model's heatmaps sit relative to the objects of its validation images
    (the label's CAM at input resolution, each normalized to sum 1):

    - ``profile``: the mean heatmap resampled into the frame of the object's box, [grid, grid]
      over box coordinates -0.5 .. 1.5 (the box is 0 .. 1);
    - ``shares``: the mass on the object's mask, on its outline (the mask less its 2-px
      erosion) and off the object;
    - ``offset_corr_y`` / ``offset_corr_x``: Pearson correlation, over the images, between where
      the heatmap's centroid sits inside the box (relative to the box's center, in box sizes)
      and where the box sits in the image (its center relative to the image's, in image
      sizes). Negative: heatmaps lean toward the image's center; 0: no pull;
    - ``peaks_off_center``: the share of heatmaps whose maximum lies outside the central half
      of the box (more than a quarter box size from its center along x or y).
    """
    with open_run(run_dir) as run:
        return _geometry(run, grid)


def _geometry(run: TrainedRun, grid: int) -> dict:
    val, cam = run.bundle.val, run.cam
    S = run.loaded.image_size
    profile = torch.zeros(grid, grid, dtype=torch.float64)
    shares = torch.zeros(3, dtype=torch.float64)
    coords = torch.linspace(-0.5, 1.5, grid)
    pixel = torch.arange(S, dtype=torch.float64) + 0.5
    inside_box, box_in_image, off_center = [], [], 0
    for start in range(0, len(val), 100):
        sl = slice(start, start + 100)
        heat = resize_heatmaps(cam(data.normalize(val.images[sl]), val.labels[sl]).cams.detach().float(), S)
        heat = heat / heat.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]
        mask = val.masks[sl].float()
        inner = -F.max_pool2d(-mask[:, None], 5, stride=1, padding=2)[:, 0]
        for k, region in enumerate((inner, mask - inner, 1 - mask)):
            shares[k] += (heat * region).flatten(1).sum(1).double().sum()
        x0, y0, x1, y1 = val.boxes[sl, 0].double().unbind(1)
        gx = (x0[:, None] + coords[None] * (x1 - x0)[:, None]) / S * 2 - 1  # box coords -> [-1, 1]
        gy = (y0[:, None] + coords[None] * (y1 - y0)[:, None]) / S * 2 - 1
        where = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1).float()
        profile += F.grid_sample(heat[:, None], where, align_corners=False)[:, 0].double().sum(0)
        h = heat.double()
        cy, cx = (h.sum(2) * pixel).sum(1), (h.sum(1) * pixel).sum(1)
        bx, by, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0).clamp_min(1), (y1 - y0).clamp_min(1)
        inside_box.append(torch.stack([(cy - by) / bh, (cx - bx) / bw], 1))
        box_in_image.append(torch.stack([(by - S / 2) / S, (bx - S / 2) / S], 1))
        peak = h.flatten(1).argmax(1)
        py, px = peak // S + 0.5, peak % S + 0.5
        off_center += int((((py - by).abs() > bh / 4) | ((px - bx).abs() > bw / 4)).sum())
    n = len(val)
    a, b = torch.cat(inside_box), torch.cat(box_in_image)
    corr = [float(torch.corrcoef(torch.stack([a[:, k], b[:, k]]))[0, 1]) for k in (0, 1)]
    return {
        "profile": profile / n,
        "shares": dict(zip(("object interior", "object outline", "off the object"), (shares / n).tolist())),
        "offset_corr_y": corr[0],
        "offset_corr_x": corr[1],
        "peaks_off_center": 100.0 * off_center / n,
    }


def overlay_figure(path: Path, runs: list[Path], names: list[str], n: int = 12) -> Path:
    """The first ``n`` validation images of the runs' dataset and each run's heatmap of its
    predicted class, side by side (the runs share their data)."""
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_run(r)) for r in runs]
        bundle = opened[0].bundle
        return viz.save_overlays(path, [r.cam for r in opened], names, bundle.val, "cpu", n, bundle.classes)


def coverage_figure(out: Path, size: int = 64, draws: int = 40000, seed: int = 0) -> Path:
    """How often each pixel is inside the augmented view's crop, measured from ``draws`` boxes
    of each sampler (:data:`cgc.transforms.SAMPLERS`, the default area and aspect ranges) on a
    ``size`` x ``size`` image: RandomResizedCrop's peak at the center, the uniform sampler's flat."""
    from .transforms import SAMPLERS, random_crop_flip

    fig = viz.figure(3.4 * len(SAMPLERS), 3.3)
    axes = fig.subplots(1, len(SAMPLERS), squeeze=False)[0]
    r = torch.arange(size)
    for ax, sampler in zip(axes, SAMPLERS):
        boxes = random_crop_flip(draws, size, size, sampler=sampler, generator=torch.Generator().manual_seed(seed))
        top, left, h, w = boxes.boxes.unbind(1)
        rows = (r[None] >= top[:, None]) & (r[None] < (top + h)[:, None])
        cols = (r[None] >= left[:, None]) & (r[None] < (left + w)[:, None])
        inside = (rows.float().T @ cols.float()) / draws  # [size, size]: P(pixel inside the crop)
        shown = ax.imshow(inside.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{sampler}: {inside.min():.2f} (corner) - {inside.max():.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(f"P(pixel inside the augmented view's crop), {draws} draws at {size} px, area 8-100 %", fontsize=9)
    fig.savefig(out / "coverage.png")
    return out / "coverage.png"


def profile_figure(out: Path, runs: dict[str, Path]) -> Path:
    """The mean heatmap in each model's box frame, side by side (the box drawn in white)."""
    fig = viz.figure(3.0 * len(runs), 3.3)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (name, folder) in zip(axes, runs.items()):
        geometry = box_geometry(folder)
        profile, shares = geometry["profile"], geometry["shares"]
        ax.imshow(profile.numpy(), extent=(-0.5, 1.5, 1.5, -0.5), cmap="jet")
        ax.plot([0, 1, 1, 0, 0], [0, 0, 1, 1, 0], color="white", lw=1)
        inside, outline, off = shares.values()
        ax.set_title("\n".join(textwrap.fill(line, 30) for line in name.split("\n")), fontsize=8)
        ax.set_xlabel(f"interior {100 * inside:.0f}%, outline {100 * outline:.0f}%, off {100 * off:.0f}%", fontsize=8)
        ax.set_xticks([0, 1])
        ax.set_yticks([0, 1])
    fig.suptitle(
        "mean heatmap in the object's box frame (the box: 0-1); below: its mass on the object's interior, "
        "on its 2-px outline and off the object",
        fontsize=9,
    )
    fig.savefig(out / "profiles.png")
    return out / "profiles.png"


def main(argv=None) -> dict:
    """``python -m cgc.study``: see :class:`StudyConfig`."""
    with cli.exit_on_error():
        args = StudyConfig.parse(argv).validate()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        scale = QUICK if args.quick else Scale()
        path = out / "study.json"
        record = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        parts, skipped = runnable_parts(args.parts)
        for line in skipped:
            print(line, file=sys.stderr)
        runs = plan(scale, parts, args.seeds, args.screen_seeds, args.confirm, args.transformer_seeds)
        print(
            f"cgc.study: {len(runs)} runs ({sum(run_key(p, n, s) in record['runs'] for p, n, s, _ in runs)} "
            f"already in {path})",
            file=sys.stderr,
        )
        execute(out, runs, record)
        planned = {run_key(p, n, s) for p, n, s, _ in runs}
        summary = summarize({"runs": {k: v for k, v in record["runs"].items() if k in planned}})
        record["summary"] = {
            part: {name: {k: list(v) for k, v in stats.items()} for name, stats in configs.items()}
            for part, configs in summary.items()
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        (out / "tables.md").write_text(report(summary) + "\n")
        written = figures(out, summary)
        seed = args.seeds[0]
        shown = {
            f"{name}\n(seed {seed}, top-1 {record['runs'][key]['results']['val_top1']:.0f} %)": out / "runs" / key
            for name in ("ce", "cgc", "cgc, T 0.5", *FIGURE_OPTIONS)
            if (key := run_key("localization", name, seed)) in record["runs"]
        }
        if shown:
            written.append(profile_figure(out, shown))
        if "localization" in parts:
            written.append(coverage_figure(out, size=QUICK.image_size if args.quick else Scale().image_size))
        vits = [run_key("transformers", name, (args.transformer_seeds or args.seeds)[0]) for name in ("ce", "cgc")]
        if all(key in record["runs"] for key in vits):
            shown_vits = [out / "runs" / key for key in vits]
            written.append(overlay_figure(out / "transformers.png", shown_vits, ["ViT, CE", "ViT, CGC"]))
        print(report(summary))
        print(f"wrote {path}, {out / 'tables.md'}, " + ", ".join(str(p) for p in written), file=sys.stderr)
        return record


if __name__ == "__main__":
    main()
