"""The study's numbers: each configuration against its part's baseline on the same seeds.

For every configuration: each seed's top-1, how many runs stayed at chance (final top-1 below
twice chance: their heatmaps say nothing, so they are counted apart and never averaged into the
explanation measures), the mean of every measure with its 95 % t-interval, and the paired
difference from the baseline (CE) with its 95 % t-interval over the seeds where both learned.
"""

from __future__ import annotations

from cgc import tables

from .plan import BASELINES, SEMI
from .stats import Interval, mean_interval, paired_difference

#: a run whose final top-1 is below this many times chance never left chance
CHANCE_FACTOR = 2.0
#: the explanation measures, in table order: (key, header, digits)
EXPLANATION_COLUMNS = (
    ("consistency", "consistency (cosine) ↑", 3),
    ("consistency_iou", "consistency (top-20 % IoU) ↑", 3),
    ("content_heatmap", "content heatmap (%) ↑", 1),
    ("pointing_game", "pointing game (%) ↑", 1),
    ("pointing_game_off_center", "pointing game, off-center objects (%) ↑", 1),
    ("class_specificity", "class-specificity (1 - cos) ↑", 3),
    ("random_logit", "random logit ↓", 3),
    ("sparseness", "sparseness ↑", 3),
    ("mprt", "MPRT ↓", 3),
)
GEOMETRY_COLUMNS = (
    ("offset_corr_y", "offset corr. y", 2),
    ("offset_corr_x", "offset corr. x", 2),
    ("peaks_off_center", "peaks off center (%)", 0),
)
#: what a centered Gaussian scores in the pointing game (the same for every run on the same images)
BASELINE_MEASURES = ("pointing_game_center", "pointing_game_center_off_center")
MEASURES = ("val_top1", *(k for k, _, _ in EXPLANATION_COLUMNS + GEOMETRY_COLUMNS), *BASELINE_MEASURES)


def classes_of(config: dict) -> int:
    return len(config["classes"]) if config.get("classes") else config["num_classes"]


def at_chance(run: dict) -> bool:
    """Whether a run never left chance (final top-1 below :data:`CHANCE_FACTOR` x chance)."""
    return run["results"]["val_top1"] < CHANCE_FACTOR * 100 / classes_of(run["config"])


def measures(run: dict) -> dict[str, float]:
    """A run's numbers: its results, and its explanations measured again where they were."""
    found = {**run["results"], **run.get("evaluation", {})}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _interval(iv: Interval | None) -> dict | None:
    return None if iv is None else {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def summarize(record: dict, keys) -> dict:
    """``{part: {configuration: summary}}`` of the runs ``keys`` of ``record`` (study.json): each
    seed's top-1, the seeds at chance, every measure's mean and its paired difference from the
    part's baseline (``vs_baseline``), as plain numbers."""
    grouped: dict = {}
    for key in keys:
        if key in record["runs"]:
            run = record["runs"][key]
            grouped.setdefault(run["part"], {}).setdefault(run["name"], {})[run["seed"]] = run
    return {part: {name: _configuration(part, name, configs) for name in configs} for part, configs in grouped.items()}


def _configuration(part: str, name: str, configs: dict) -> dict:
    runs = configs[name]
    baseline = configs.get(_baseline_of(part, name))
    learned = {s: measures(r) for s, r in runs.items() if not at_chance(r)}
    summary = {
        "top1_by_seed": {s: r["results"]["val_top1"] for s, r in sorted(runs.items())},
        "at_chance": sorted(s for s, r in runs.items() if at_chance(r)),
        "mean": {},
        "vs_baseline": {},
    }
    for key in MEASURES:
        every_run = key == "val_top1" or key in BASELINE_MEASURES  # the baseline is no model's
        pool = {s: m[key] for s, m in (_all(runs) if every_run else learned.items()) if key in m}
        summary["mean"][key] = _interval(mean_interval(pool.values())) if pool else None
        if baseline is not None and baseline is not runs and key not in BASELINE_MEASURES:
            base = {s: measures(r) for s, r in baseline.items() if key == "val_top1" or not at_chance(r)}
            theirs = {s: m[key] for s, m in base.items() if key in m}
            summary["vs_baseline"][key] = _interval(paired_difference(theirs, pool))
    if baseline is not None and baseline is not runs:
        diffs = [runs[s]["results"]["val_top1"] - baseline[s]["results"]["val_top1"] for s in runs if s in baseline]
        summary["worst_top1_difference"] = min(diffs) if diffs else None
    return summary


def _all(runs: dict):
    return ((s, measures(r)) for s, r in runs.items())


def _baseline_of(part: str, name: str) -> str | None:
    """The configuration ``name`` is compared with: the part's baseline, or for fine-tuning the
    CE run with the same images per class."""
    if part in BASELINES:
        return BASELINES[part]
    if part in ("transfer", "semi", "tuning-finetune"):
        return "ce, " + name.rsplit(", ", 1)[1] if part != "semi" else "ce, labeled only, " + name.rsplit(", ", 1)[1]
    return None


def _cell(iv: dict | None, digits: int, sign: bool = False) -> str:
    if iv is None:
        return "—"
    return Interval(iv["mean"], iv["low"], iv["high"], iv["n"]).show(digits=digits, sign=sign)


def accuracy_table(configs: dict) -> str:
    """Top-1 of every configuration: each seed's, the runs at chance, the mean and the paired
    difference from the baseline, and the worst seed's difference."""
    rows = []
    for name, s in configs.items():
        by_seed = " / ".join(f"{v:.1f}" for v in s["top1_by_seed"].values())
        chance = f"{len(s['at_chance'])} of {len(s['top1_by_seed'])}"
        diff = s["vs_baseline"].get("val_top1")
        worst = s.get("worst_top1_difference")
        rows.append(
            [name, by_seed, chance, _cell(s["mean"]["val_top1"], 1), _cell(diff, 1, sign=True),
             None if worst is None else f"{worst:+.1f}"]
        )  # fmt: skip
    headers = [
        "configuration",
        "top-1 by seed (%)",
        "stayed at chance",
        "val top-1 (%)",
        "Δ top-1 vs CE",
        "worst seed's Δ",
    ]
    return tables.markdown(headers, rows)


def explanation_table(configs: dict, columns=EXPLANATION_COLUMNS) -> str:
    """The baseline's mean of every measure over its runs that learned, and every other
    configuration's paired difference from it over the seeds where both learned."""
    rows = []
    for name, s in configs.items():
        paired = bool(s["vs_baseline"])
        cells = [
            _cell(s["vs_baseline"].get(key) if paired else s["mean"].get(key), digits, sign=paired)
            for key, _, digits in columns
        ]
        learned = len(s["top1_by_seed"]) - len(s["at_chance"])
        rows.append([name, learned, *cells])
    return tables.markdown(["configuration", "runs that learned", *(h for _, h, _ in columns)], rows)


def center_baseline(configs: dict) -> str:
    """One line: what a centered Gaussian scores in the pointing game on the part's images."""
    first = next(iter(configs.values()))["mean"]
    overall, off = first.get("pointing_game_center"), first.get("pointing_game_center_off_center")
    if overall is None:
        return ""
    return (
        f"Center baseline (a Gaussian at the image center, the same for every image): pointing game "
        f"{_cell(overall, 1)} %, on off-center objects {_cell(off, 1)} %."
    )


TITLES = {
    "tuning": "Tuning split: the term's safeguards",
    "localization": "Explanations: the default term and its options",
    "placement": "Objects near the center, as in photographs",
    "transformers": "A vision transformer",
    "tuning-finetune": "Tuning split: the term when fine-tuning opens it at the first step",
    "transfer": "Limited data: fine-tuning on six new shapes",
    "semi": "Unlabeled data: N labeled images per class, the other training images unlabeled",
}


def markdown(summary: dict) -> str:
    """Markdown tables of every part: accuracy, then explanations (baseline: mean [95 % CI];
    the others: paired difference from it [95 % CI])."""
    lines = [
        "## python -m study",
        "",
        "Every configuration run. Top-1: each seed's, how many runs stayed at chance (final top-1 below",
        "twice chance), the mean [95 % t-interval] and the paired difference from CE on the same seeds",
        "[95 % t-interval]. Explanations (measured on each run's final weights with one protocol): CE's",
        "mean over its runs that learned, and every other configuration's paired difference from CE over",
        "the seeds where both learned. study.json holds every run's config and results.",
        "",
    ]
    for part, title in TITLES.items():
        if part not in summary:
            continue
        configs = summary[part]
        if part in ("transfer", "semi", "tuning-finetune"):
            configs = dict(sorted(configs.items(), key=lambda item, part=part: _shots_then_variant(part, item[0])))
        lines += [f"### {title}", "", accuracy_table(configs), ""]
        if any(s["mean"].get("consistency") for s in configs.values()):
            lines += [explanation_table(configs), ""]
            if any(s["mean"].get("offset_corr_y") for s in configs.values()):
                lines += [explanation_table(configs, GEOMETRY_COLUMNS), ""]
        if baseline := center_baseline(configs):  # the images' layout: there even when no run learned
            lines += [baseline, ""]
    return "\n".join(lines)


def _shots_then_variant(part: str, name: str) -> tuple[int, int]:
    """Sort key of a fine-tuning configuration ``"<variant>, <N>/class"``: by N, then as planned."""
    variant, shots = name.rsplit(", ", 1)
    order = list(SEMI if part == "semi" else ("ce", "cgc"))
    return int(shots.split("/")[0]), order.index(variant) if variant in order else len(order)
