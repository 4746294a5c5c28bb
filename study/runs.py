"""Running the study's runs and measuring them again on their final weights.

Every run is a call of :func:`cgc.train.run` (its log under ``OUT/runs/``), recorded in
``OUT/study.json`` as it finishes, so an interrupted study continues where it stopped. Each
explained run's heatmaps are measured again on its final weights with one protocol
(:data:`EVALUATED`: the evaluation's crops for consistency whatever the run trained with, the
sanity checks, the center baseline) and located in its objects' boxes (:func:`box_geometry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cgc import data, metrics, train
from cgc.cam import CAM, resize_heatmaps
from cgc.checkpoint import LoadedModel, load_model
from cgc.train_config import TrainConfig

from .plan import PlannedRun, identity

#: measured again on every explained run's final weights
EVALUATED = (
    *metrics.TRAINING_METRICS,
    "pointing_game_off_center",
    "pointing_game_center",
    "class_specificity",
    "sparseness",
    "random_logit",
    "mprt",
)
#: where the heatmaps sit relative to the objects (:func:`box_geometry`)
GEOMETRY = ("offset_corr_y", "offset_corr_x", "peaks_off_center")
#: the parts whose runs' explanations are measured again
EXPLAINED = ("tuning", "localization", "placement", "transformers")
#: shown after each run on the terminal
SHOWN = ("val_top1", *metrics.TRAINING_METRICS)


@contextlib.contextmanager
def log_to(path: Path):
    """While the block runs, the library's log (progress lines included) goes to ``path`` only."""
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


def execute(out: Path, runs: list[PlannedRun], record: dict) -> None:
    """Each run not yet in ``record`` (study.json), one after another, quietly: its log goes to
    its folder's train.log, one line per run to the terminal. A run that starts from another's
    weights gets that run's ``last.pt``."""
    done = {r["identity"]: r for r in record["runs"].values()}
    for i, run in enumerate(runs, 1):
        if run.key in record["runs"]:
            continue
        same = identity(run.config, run.after)
        if same in done:  # the same run under another name (CE fine-tuning is in two claims)
            record["runs"][run.key] = {**done[same], "part": run.part, "name": run.name}
            continue
        folder = out / "runs" / run.key
        folder.mkdir(parents=True, exist_ok=True)
        weights = str(out / "runs" / run.after / "last.pt") if run.after else run.config.model.weights
        config = run.config.replace(out=str(folder), weights=weights)
        t0 = time.time()
        with log_to(folder / "train.log"):
            results = train.run(config)
        entry = {"part": run.part, "name": run.name, "seed": run.seed, "identity": same}
        record["runs"][run.key] = done[same] = entry | {"config": config.flat(), "results": results}
        if run.part in EXPLAINED:
            record["runs"][run.key]["evaluation"] = evaluate_run(folder)
        (out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
        shown = ", ".join(f"{k} {results[k]:.3f}" for k in SHOWN if isinstance(results.get(k), float))
        print(f"[{i}/{len(runs)}] {run.key}: {shown} ({time.time() - t0:.0f} s)", flush=True)


def compact(record: dict) -> dict:
    """``record`` (study.json) as the repository keeps it (``docs/study/*.json``): every run's
    part, name, seed, the settings that differ from today's defaults (and the class count), and
    every number of its results and of its explanations measured again; no curves or profiles.
    :func:`study.report.summarize` recomputes every table from it."""
    defaults = TrainConfig().flat()

    def numbers(values: dict) -> dict:
        return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def settings(config: dict) -> dict:
        kept = ("classes", "num_classes")
        return {k: v for k, v in config.items() if k in kept or (k in defaults and defaults[k] != v and k != "out")}

    runs = {
        key: {
            "part": run["part"],
            "name": run["name"],
            "seed": run["seed"],
            "config": settings(run["config"]),
            "results": numbers(run["results"]),
            "evaluation": numbers(run.get("evaluation", {})),
        }
        for key, run in sorted(record["runs"].items())
    }
    return {"runs": runs}


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
    bundle = data.build_for_run(loaded.config.data, loaded.config.run.seed, {"train_size": 1})
    with CAM(loaded.model.eval(), loaded.target_layer, method=loaded.method) as cam:
        yield TrainedRun(loaded, bundle, cam)


def evaluate_run(folder: Path) -> dict:
    """:data:`EVALUATED` on a run's final weights (``last.pt``), the evaluation's defaults, and
    where its heatmaps sit in the objects' boxes (:data:`GEOMETRY`, :func:`box_geometry`)."""
    with open_run(folder) as run:
        out = metrics.explanation_metrics(run.cam, run.bundle.val, "cpu", metrics=metrics.select(list(EVALUATED)))
        geometry = _geometry(run, 33)
    extra = ("mprt_steps", "pointing_game_center_off_center")
    return {k: out[k] for k in (*EVALUATED, *extra)} | {k: geometry[k] for k in GEOMETRY}


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
