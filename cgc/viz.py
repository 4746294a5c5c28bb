"""Pictures: heatmap overlays (PIL), training and metric curves and the randomization figure
(matplotlib, drawn on its Agg canvas without pyplot's global state), as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from . import data
from .cam import resize_heatmaps
from .metrics import eval_batches, eval_mode, randomization_steps, randomized_models


def jet(h: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] [...] to the jet color map [..., 3] in [0, 1]."""
    x = h.clamp(0, 1)[..., None]
    centers = torch.tensor([3.0, 2.0, 1.0], device=h.device) / 4
    return (1.5 - (4 * (x - centers)).abs()).clamp(0, 1)


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend an image [3,H,W] in [0,1] with a heatmap [H,W] (scaled to its max) -> [3,H,W]."""
    h = heatmap / heatmap.max().clamp_min(1e-12)
    return (1 - alpha) * image + alpha * jet(h).permute(2, 0, 1)


def _to_pil(img: torch.Tensor, scale: int) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_overlay_grid(
    path: str | Path,
    images: torch.Tensor,
    heatmaps: Sequence[torch.Tensor],
    column_titles: Sequence[str],
    *,
    boxes: torch.Tensor | None = None,
    captions: Sequence[str] | None = None,
    columns: int = 4,
    min_size: int = 160,
) -> Path:
    """A grid of tiles; each tile shows an image [3,H,W] and one overlay per heatmap set
    (``heatmaps[m][i]`` [H,W] for model/column m), ground-truth boxes [N,nb,4] (x0,y0,x1,y1)
    outlined, a caption per tile. Tiny images are enlarged (nearest) to ``min_size``."""
    n, _, H, W = images.shape
    scale = max(1, -(-min_size // max(H, W)))
    font = ImageFont.load_default()
    cols_per_tile = 1 + len(heatmaps)
    tw, th = cols_per_tile * W * scale + (cols_per_tile - 1) * 2, H * scale + 30
    grid_cols = min(columns, n)
    grid_rows = -(-n // grid_cols)
    canvas = Image.new("RGB", (grid_cols * (tw + 10) + 10, 24 + grid_rows * (th + 10)), "white")
    draw = ImageDraw.Draw(canvas)
    header = "   |   ".join(["image"] + list(column_titles))
    draw.text((10, 6), header, fill="black", font=font)
    for i in range(n):
        r, c = divmod(i, grid_cols)
        x0, y0 = 10 + c * (tw + 10), 24 + r * (th + 10)
        panels = [images[i]] + [overlay(images[i], hm[i]) for hm in heatmaps]
        for k, panel in enumerate(panels):
            px = x0 + k * (W * scale + 2)
            canvas.paste(_to_pil(panel, scale), (px, y0))
            if boxes is not None:
                for bx in boxes[i].tolist():
                    if bx[2] > bx[0] and bx[3] > bx[1]:
                        draw.rectangle(
                            [px + bx[0] * scale, y0 + bx[1] * scale, px + bx[2] * scale - 1, y0 + bx[3] * scale - 1],
                            outline=(255, 255, 255),
                            width=2,
                        )
        if captions is not None:
            draw.text((x0, y0 + H * scale + 4), captions[i], fill="black", font=font)
    path = Path(path)
    canvas.save(path)
    return path


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_curves(
    path: str | Path, panels: dict[str, dict[str, Sequence[tuple[float, float]]]], xlabel: str = "epoch"
) -> Path:
    """Line charts side by side: ``panels[title][series] = [(x, y), ...]`` -> PNG. Series whose
    name starts with ``train`` are dashed and those with ``val`` solid with markers (the same
    color for the same quantity), and each panel's legend sits below its axes, clear of the
    lines."""
    fig = figure(4.6 * max(1, len(panels)), 3.6)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels.items()):
        for k, (name, points) in enumerate(series.items()):
            if not points:
                continue
            xs, ys = zip(*points)
            style = dict(color=f"C{k}", lw=1.8)
            if name.startswith("train"):
                style.update(ls="--")
            elif name.startswith("val"):
                style.update(marker="o", ms=3.5)
            ax.plot(xs, ys, label=name, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if any(series.values()):
            ax.legend(
                loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, len(series)), fontsize=8, frameon=False
            )
    path = Path(path)
    fig.savefig(path)
    return path


def save_overlays(
    path: str | Path,
    cams: Sequence,
    titles: Sequence[str],
    dataset,
    device,
    n: int,
    classes: Sequence[str],
    model_classes: Sequence[Sequence[str]] | None = None,
) -> Path:
    """PNG of the first ``n`` images of ``dataset``: the image, then for each
    :class:`cgc.CAM` in ``cams`` (one per model) the heatmap of the class that model
    predicts, ground-truth boxes outlined if any; captions ``label -> each model's class``
    (named from ``model_classes[m]`` when a model's classes are not the dataset's)."""
    model_classes = model_classes or [classes] * len(cams)
    images, labels, boxes = next(eval_batches(dataset, n, n))
    x = data.normalize(images.to(device))
    heatmaps, preds = [], []
    for cam in cams:
        with eval_mode(cam.model):
            out = cam(x)
        heatmaps.append(resize_heatmaps(out.cams, tuple(x.shape[-2:])).cpu())
        preds.append(out.targets.cpu())
    captions = [
        f"{classes[int(label)]} -> " + " / ".join(names[int(p[i])] for p, names in zip(preds, model_classes))
        for i, label in enumerate(labels)
    ]
    return save_overlay_grid(path, images.float() / 255, heatmaps, titles, boxes=boxes, captions=captions)


def save_randomization(path: str | Path, cams: Sequence, titles: Sequence[str], dataset, device, settings) -> Path:
    """The cascading-randomization figure: one row per model (``cams``), the first image of
    ``dataset`` with a box (else the first), then its heatmap for the class the model predicts
    with the original weights and after each randomization step of
    :func:`cgc.metrics.randomized_models` (the same seed and steps as the MPRT metric)."""
    images, _, boxes = next(eval_batches(dataset, min(len(dataset), 64), min(len(dataset), 64)))
    pick = 0
    if boxes is not None:
        has = ((boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])).any(1)
        pick = int(has.float().argmax()) if has.any() else 0
    image = images[pick : pick + 1]
    x = data.normalize(image.to(device))
    size = tuple(x.shape[-2:])
    rows = []
    for cam in cams:
        with eval_mode(cam.model):
            first = cam(x)
            tiles = [("original", resize_heatmaps(first.cams.float(), size)[0].cpu())]
            steps = randomization_steps(cam.model, settings.randomization, size[0])
            for name, twin in randomized_models(cam.model, steps, seed=settings.metric_seed):
                with cam.with_model(twin) as moved:
                    tiles.append((name, resize_heatmaps(moved(x, first.targets).cams.float(), size)[0].cpu()))
        rows.append(tiles)
    cols = 1 + max(len(r) for r in rows)
    fig = figure(1.5 * cols, 1.7 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    picture = image[0].float().permute(1, 2, 0).numpy() / 255
    for r, (title, tiles) in enumerate(zip(titles, rows)):
        axes[r, 0].imshow(picture)
        axes[r, 0].set_ylabel(title, fontsize=9)
        for c, (name, heat) in enumerate(tiles, start=1):
            axes[r, c].imshow(overlay(image[0].float() / 255, heat).clamp(0, 1).permute(1, 2, 0).numpy())
            axes[r, c].set_title(name, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r, 1 + len(tiles) :]:
            ax.axis("off")
    fig.suptitle("heatmap after randomizing the weights from the head down (cumulative)", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path
