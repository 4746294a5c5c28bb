"""Pictures: heatmap overlays and training/metric curves as PNG, drawn with PIL only."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from . import data
from .cam import resize_heatmaps
from .metrics import eval_batches, eval_mode

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def jet(h: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] [...] to the jet colour map [..., 3] in [0, 1]."""
    x = h.clamp(0, 1)[..., None]
    centres = torch.tensor([3.0, 2.0, 1.0], device=h.device) / 4
    return (1.5 - (4 * (x - centres)).abs()).clamp(0, 1)


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend an image [3,H,W] in [0,1] with a heatmap [H,W] (scaled to its max) -> [3,H,W]."""
    h = heatmap / heatmap.max().clamp_min(1e-12)
    return (1 - alpha) * image + alpha * jet(h).permute(2, 0, 1)


def _to_pil(img: torch.Tensor, scale: int) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_overlay_grid(path: str | Path, images: torch.Tensor, heatmaps: Sequence[torch.Tensor],
                      column_titles: Sequence[str], *, boxes: torch.Tensor | None = None,
                      captions: Sequence[str] | None = None, columns: int = 4,
                      min_size: int = 160) -> Path:
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
                        draw.rectangle([px + bx[0] * scale, y0 + bx[1] * scale,
                                        px + bx[2] * scale - 1, y0 + bx[3] * scale - 1],
                                       outline=(255, 255, 255), width=2)
        if captions is not None:
            draw.text((x0, y0 + H * scale + 4), captions[i], fill="black", font=font)
    path = Path(path)
    canvas.save(path)
    return path


def plot_curves(path: str | Path, panels: dict[str, dict[str, Sequence[tuple[float, float]]]],
                size: tuple[int, int] = (420, 300), xlabel: str = "epoch") -> Path:
    """Line charts side by side: ``panels[title][series] = [(x, y), ...]`` -> PNG."""
    font = ImageFont.load_default()
    pw, ph = size
    canvas = Image.new("RGB", (pw * len(panels), ph), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, series) in enumerate(panels.items()):
        ox = p * pw
        left, top, right, bottom = ox + 55, 25, ox + pw - 15, ph - 35
        pts = [xy for s in series.values() for xy in s]
        draw.text((ox + pw // 2 - 3 * len(title), 6), title, fill="black", font=font)
        draw.rectangle([left, top, right, bottom], outline="black")
        if not pts:
            continue
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymax = ymin + 1
        pad = 0.05 * (ymax - ymin)
        ymin, ymax = ymin - pad, ymax + pad

        def to_px(x, y):
            return (left + (x - xmin) / (xmax - xmin) * (right - left),
                    bottom - (y - ymin) / (ymax - ymin) * (bottom - top))

        for frac in (0.0, 0.5, 1.0):
            yv = ymin + frac * (ymax - ymin)
            _, yp = to_px(xmin, yv)
            draw.line([left - 4, yp, left, yp], fill="black")
            draw.text((ox + 4, yp - 6), f"{yv:.3g}", fill="black", font=font)
        for xv in (xmin, xmax):
            xp, _ = to_px(xv, ymin)
            draw.text((xp - 6, bottom + 4), f"{xv:g}", fill="black", font=font)
        draw.text((ox + pw // 2 - 3 * len(xlabel), ph - 14), xlabel, fill="black", font=font)
        for k, (name, s) in enumerate(series.items()):
            color = PALETTE[k % len(PALETTE)]
            xy = [to_px(x, y) for x, y in s]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((left + 6, top + 4 + 12 * k), name, fill=color, font=font)
    path = Path(path)
    canvas.save(path)
    return path


def save_overlays(path: str | Path, cams: Sequence, titles: Sequence[str], dataset, device, n: int,
                  classes: Sequence[str]) -> Path:
    """PNG of the first ``n`` images of ``dataset``: the image, then for each
    :class:`cgc.GradCAM` in ``cams`` (one per model) the heatmap of the class that model
    predicts, ground-truth boxes outlined if any; captions ``label -> each model's class``."""
    images, labels, boxes = next(eval_batches(dataset, n, n))
    x = data.normalize(images.to(device))
    heatmaps, preds = [], []
    for cam in cams:
        with eval_mode(cam.model):
            out = cam(x)
        heatmaps.append(resize_heatmaps(out.cams, tuple(x.shape[-2:])).cpu())
        preds.append(out.targets.cpu())
    captions = [f"{classes[int(label)]} -> " + " / ".join(classes[int(p[i])] for p in preds)
                for i, label in enumerate(labels)]
    return save_overlay_grid(path, images.float() / 255, heatmaps, titles, boxes=boxes, captions=captions)
