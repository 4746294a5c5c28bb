"""The study's figures: the paired differences from CE with their intervals, accuracy against
images per class, the crops' coverage, where heatmaps sit in their objects' boxes, and a ViT's
overlays."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

import torch

from cgc import viz
from cgc.transforms import SAMPLERS, random_crop_flip

from .runs import box_geometry, open_run

#: the measures of the localization figure: (key, label)
FIGURE_MEASURES = (
    ("val_top1", "top-1 (points)"),
    ("consistency", "consistency (cosine)"),
    ("consistency_iou", "consistency (IoU)"),
    ("content_heatmap", "content heatmap (points)"),
    ("pointing_game", "pointing game (points)"),
    ("pointing_game_off_center", "pointing game, off-center (points)"),
    ("class_specificity", "class-specificity"),
    ("random_logit", "random logit (lower is better)"),
)


def differences_figure(path: Path, configs: dict, title: str) -> Path:
    """One panel per measure: each configuration's paired difference from CE with its 95 %
    interval (a bar that does not cross 0 is an effect larger than the seeds' noise)."""
    names = [n for n, s in configs.items() if s["vs_baseline"]]
    keys = [(k, label) for k, label in FIGURE_MEASURES if any(configs[n]["vs_baseline"].get(k) for n in names)]
    cols = 4
    rows = -(-len(keys) // cols)
    fig = viz.figure(3.2 * cols, 0.35 * len(names) * rows + 1.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (key, label) in zip(axes, keys):
        for y, name in enumerate(names):
            iv = configs[name]["vs_baseline"].get(key)
            if iv is None:
                continue
            err = [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]] if iv["n"] > 1 else None
            ax.errorbar([iv["mean"]], [y], xerr=err, fmt="o", color=f"C{y}", capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(names)), names if ax is axes[0] or ax is axes[cols * (len(keys) > cols)] else [])
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys) :]:
        ax.remove()
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)
    return path


def shots_figure(path: Path, configs: dict, title: str, labels) -> Path:
    """Val top-1 (mean and 95 % interval over the seeds) against labeled images per class, one
    line per variant."""
    fig = viz.figure(5.5, 3.6)
    ax = fig.subplots()
    for j, label in enumerate(labels):
        points = sorted(
            (int(name.rsplit(", ", 1)[1].split("/")[0]), s["mean"]["val_top1"])
            for name, s in configs.items()
            if name.rsplit(", ", 1)[0] == label
        )
        if points:  # each series a little to the right of the last, so that the error bars do not overlap
            ax.errorbar(
                [n * 1.04**j for n, _ in points],
                [iv["mean"] for _, iv in points],
                yerr=[[iv["mean"] - iv["low"] for _, iv in points], [iv["high"] - iv["mean"] for _, iv in points]],
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
    ax.set_ylabel("val top-1 (%), mean and 95 % interval")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


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
    title = (
        "mean heatmap in the object's box frame (the box: 0-1); below: its mass on the object's interior, "
        "on its 2-px outline and off the object"
    )
    fig.suptitle(textwrap.fill(title, 18 * len(runs) + 20), fontsize=9)
    fig.savefig(out / "profiles.png")
    return out / "profiles.png"
