"""Batched metrics of classifiers and their explanations (protocols: METHOD.md).

Every function works on whole batches on the tensors' device. The functions that run a model
put it in eval mode for the measurement and restore the mode it had (the reference insertion
script left models in train mode, corrupting BatchNorm statistics).

- accuracy: :func:`topk_correct`;
- agreement with annotations: :func:`content_heatmap`, :func:`pointing_game` (regions from
  :func:`box_region` or masks);
- faithfulness: :func:`insertion_deletion` (RISE's insertion / deletion curves and AUCs);
- consistency under crop/flip: :func:`consistency` (:func:`cosine`, :func:`topk_iou`);
- all of them over a dataset: :func:`explanation_metrics`.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import data, ops, transforms
from .cam import GradCAM, resize_heatmaps
from .progress import progress

#: RISE's reference: 224 * 8 pixels per step at 224 x 224, i.e. 28 steps (+ the start image)
REFERENCE_STEPS = 28


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluate ``model`` in eval mode, then give every submodule back its own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k logits, for each k (k capped at the
    number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks}


def box_region(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of boxes [B,N,4] (x0, y0, x1, y1 pixel edges; empty boxes ignored) -> bool [B,H,W]."""
    H, W = size
    ys = torch.arange(H, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(W, device=boxes.device, dtype=boxes.dtype) + 0.5
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)
    return inside.any(1)


def content_heatmap(heatmaps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Percentage of each heatmap's energy [B,H,W] inside ``region`` [B,H,W] (bool).

    Heatmaps are ReLU'd and normalised to sum 1; an all-zero heatmap carries no evidence and
    counts as uniform (its score is the region's area fraction).
    """
    h = heatmaps.clamp_min(0).flatten(1).double()
    total = h.sum(1, keepdim=True)
    h = torch.where(total > 0, h / total.clamp_min(1e-300), torch.full_like(h, 1.0 / h.shape[1]))
    return 100 * (h * region.flatten(1)).sum(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two batches of maps [B,...] (0 where a map is all zero)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def topk_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """IoU of the top-``fraction`` pixels of each pair of maps [B,...]."""
    a, b = a.flatten(1), b.flatten(1)
    k = max(1, round(fraction * a.shape[1]))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, 1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, 1).indices, True)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def consistency(cam: GradCAM, images: torch.Tensor, theta: torch.Tensor,
                size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Agreement between the heatmap of each transformed image and the transformed heatmap of
    the original, both at ``size`` (default: the images' size), for the class predicted on
    the original: ``(cosine [B], top-20 % IoU [B])``. The model is run as it is (mode kept)."""
    size = tuple(images.shape[-2:]) if size is None else size
    orig = cam(images)
    moved = ops.affine_warp(images, theta, images.shape[-2:], padding_mode="border")
    aug = cam(moved, orig.targets)
    p = ops.affine_warp(orig.cams[:, None], theta, size, padding_mode="border")[:, 0]
    q = resize_heatmaps(aug.cams, size)
    return cosine(q, p), topk_iou(q, p)


def pointing_game(heatmaps: torch.Tensor, region: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Hits [B] (bool): the maximum of each heatmap [B,H,W] lies in ``region`` [B,H,W] (bool),
    or within ``tolerance`` pixels (Euclidean, pixel centres) of it; the original pointing game
    used 15 px at 224 px. The first maximum counts; a constant heatmap points nowhere (miss)."""
    if heatmaps.dim() != 3 or region.shape != heatmaps.shape:
        raise ValueError(f"heatmaps [B,H,W] and region of the same shape expected, got "
                         f"{tuple(heatmaps.shape)} and {tuple(region.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    B, H, W = heatmaps.shape
    flat = heatmaps.flatten(1)
    peak = flat.argmax(1)
    informative = flat.amax(1) > flat.amin(1)
    if tolerance == 0:
        hit = region.flatten(1).gather(1, peak[:, None])[:, 0]
    else:
        ys = torch.arange(H, device=heatmaps.device, dtype=torch.float32)
        xs = torch.arange(W, device=heatmaps.device, dtype=torch.float32)
        py, px = (peak // W).float(), (peak % W).float()
        d2 = (ys[None, :, None] - py[:, None, None]) ** 2 + (xs[None, None, :] - px[:, None, None]) ** 2
        hit = (region & (d2 <= tolerance ** 2)).flatten(1).any(1)
    return hit & informative


def gaussian_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur of [B,C,H,W] with zero padding, as RISE's insertion
    substrate (separable: two 1-D convolutions equal the 2-D one, zero padding included)."""
    if kernel_size < 1 or kernel_size % 2 == 0 or not sigma > 0:
        raise ValueError(f"kernel_size must be odd and >= 1 and sigma > 0, got {kernel_size}, {sigma}")
    r = kernel_size // 2
    t = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - r
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = g / g.sum()
    C = images.shape[1]
    out = F.conv2d(images, g.view(1, 1, 1, -1).expand(C, 1, 1, kernel_size), padding=(0, r), groups=C)
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(C, 1, kernel_size, 1), padding=(r, 0), groups=C)


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under curves [B,n+1] sampled at n equal steps over [0, 1] (trapezoid rule)."""
    if curves.dim() != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves [B,n+1] with n >= 1 expected, got {tuple(curves.shape)}")
    return (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)


def insertion_deletion(model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, *,
                       mode: str = "insertion", step: int | None = None, batch_size: int = 256,
                       targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RISE's causal metrics of saliency maps [B,h,w] for normalised images [B,C,H,W]:
    ``(auc [B], curves [B,n+1])``.

    Pixels are taken in order of decreasing saliency (maps are resized to the image first),
    ``step`` at a time (default ``ceil(H*W / 28)``: RISE's 224 * 8 at 224 px). Insertion starts
    from :func:`gaussian_blur` (k=11, sigma=5) of the image and puts the original pixels back;
    deletion starts from the image and sets pixels to zero (the dataset mean, once
    normalised). ``curves[:, i]`` is the softmax probability, after ``i`` steps, of
    ``targets`` (default: the class predicted on the clean image). All ``B * (n+1)`` images
    are made on the fly and go through the model ``batch_size`` at a time, in eval mode.
    """
    if mode not in ("insertion", "deletion"):
        raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}")
    if images.dim() != 4 or saliency.dim() != 3 or saliency.shape[0] != images.shape[0]:
        raise ValueError(f"images [B,C,H,W] and saliency [B,h,w] expected, got "
                         f"{tuple(images.shape)} and {tuple(saliency.shape)}")
    B, _, H, W = images.shape
    HW = H * W
    step = math.ceil(HW / REFERENCE_STEPS) if step is None else step
    if step < 1 or batch_size < 1:
        raise ValueError(f"step and batch_size must be >= 1, got {step}, {batch_size}")
    n = math.ceil(HW / step)
    saliency = saliency.to(images.device, torch.float32)
    if saliency.shape[-2:] != (H, W):
        saliency = resize_heatmaps(saliency, (H, W))
    order = saliency.flatten(1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(HW, device=order.device).expand(B, HW))
    rank = rank.view(B, 1, H, W)
    if mode == "insertion":
        start, finish = gaussian_blur(images), images
    else:
        start, finish = images, torch.zeros_like(images)
    scores = torch.empty(B * (n + 1), device=images.device)
    with eval_mode(model), torch.no_grad():
        if targets is None:
            targets = model(images).argmax(1)
        targets = targets.to(images.device).long()
        for p0 in range(0, B * (n + 1), batch_size):
            p = torch.arange(p0, min(p0 + batch_size, B * (n + 1)), device=images.device)
            b, i = p // (n + 1), p % (n + 1)
            changed = rank[b] < (i * step).view(-1, 1, 1, 1)
            x = torch.where(changed, finish[b], start[b])
            probs = model(x).float().softmax(1)
            scores[p0:p0 + p.shape[0]] = probs.gather(1, targets[b, None])[:, 0]
    curves = scores.view(B, n + 1)
    return auc(curves), curves


def eval_batches(dataset, batch_size: int, limit: int | None = None, *, workers: int = 0):
    """``(uint8 images, labels, boxes or None)`` of the first ``limit`` items of ``dataset``, in
    order: boxes from :func:`cgc.data.annotated_batches` when the dataset has them; files
    are decoded by ``workers`` processes and unreadable ones left out."""
    if limit is not None and limit < len(dataset):
        dataset = data.take(dataset, range(limit))
    if hasattr(dataset, "boxes"):
        yield from data.annotated_batches(dataset, batch_size, workers=workers)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    for batch in loader:
        (images, labels), _ = data.drop_unreadable(batch[:2])
        if len(labels):
            yield images, labels, None


def explanation_metrics(cam: GradCAM, dataset, device, *, batch_size: int = 64,
                        crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE, seed: int = 12345,
                        limit: int | None = None, causal: bool = False, step: int | None = None,
                        causal_batch: int = 256, cam_input_size: int | None = None,
                        tolerance: float = 0.0, workers: int = 0, desc: str | None = None,
                        rank: int = 0, world_size: int = 1, reduce=None) -> dict:
    """Means over ``dataset`` (or its first ``limit`` images) of the metrics of METHOD.md for
    the model of ``cam``, in eval mode (restored afterwards):

    - ``top1``, ``top5`` (%);
    - ``content_heatmap`` (%) and ``pointing_game`` (% hits) of the ground-truth class's
      heatmap, computed on the image resized to ``cam_input_size`` (METHOD's protocol: 448 for
      ImageNet; default the image's size) and resized back; images without boxes are left
      out, and both are None for a dataset without boxes;
    - ``consistency`` (cosine) and ``consistency_iou`` (top-20 % IoU) under random crops/flips
      of area ``crop_scale``, each image's drawn from (``seed``, its index): the same for
      every model and any split of the images;
    - with ``causal``: ``insertion_auc``, ``deletion_auc`` (else None) and the mean curves
      ``insertion_curve``, ``deletion_curve`` of the predicted class's heatmap.

    Process ``rank`` of ``world_size`` measures every ``world_size``-th image; ``reduce``
    (:meth:`cgc.distributed.Context.sum_values`) sums the totals over the processes, so every
    process returns the numbers of the whole dataset.
    """
    model = cam.model
    sums: dict[str, float] = {}
    curves: dict[str, torch.Tensor] = {}

    def add(name: str, values: torch.Tensor, scale: float = 1.0) -> None:
        """Accumulate per-image values [b] (their sum and their count)."""
        sums[name] = sums.get(name, 0.0) + scale * float(values.double().sum())
        sums[f"{name}#n"] = sums.get(f"{name}#n", 0.0) + values.numel()

    n = len(dataset) if limit is None else min(limit, len(dataset))
    positions = list(range(rank, n, world_size))
    batches = eval_batches(data.take(dataset, positions), batch_size, workers=workers)
    if desc:
        batches = progress(batches, desc, total=-(-len(positions) // batch_size), disable=rank != 0)
    done = 0
    with eval_mode(model):
        for images, labels, boxes in batches:
            x = data.normalize(images.to(device))
            labels = labels.to(device)
            size = tuple(x.shape[-2:])
            index = positions[done:done + x.shape[0]]
            done += x.shape[0]
            with torch.no_grad():
                logits = model(x)
            hits = topk_correct(logits, labels)
            for k in (1, 5):
                sums[f"top{k}"] = sums.get(f"top{k}", 0.0) + 100.0 * hits[k]
            sums["top1#n"] = sums["top5#n"] = sums.get("top1#n", 0.0) + labels.shape[0]
            if boxes is not None:
                region = box_region(boxes.to(device).float(), size)
                has = region.flatten(1).any(1)
                xin = x if cam_input_size is None else F.interpolate(
                    x, (cam_input_size, cam_input_size), mode="bilinear", align_corners=False, antialias=True)
                hm = resize_heatmaps(cam(xin, labels).cams, size)
                add("content_heatmap", content_heatmap(hm, region)[has])
                add("pointing_game", pointing_game(hm, region, tolerance)[has], 100.0)
            keys = transforms.sample_keys(seed, 0, index, "consistency")
            tf = transforms.random_crop_flip(x.shape[0], *size, scale=tuple(crop_scale), keys=keys)
            cos, iou = consistency(cam, x, tf.theta().to(device))
            add("consistency", cos)
            add("consistency_iou", iou)
            if causal:
                out = cam(x)
                for mode in ("insertion", "deletion"):
                    area, curve = insertion_deletion(model, x, out.cams, mode=mode, step=step,
                                                     batch_size=causal_batch, targets=out.targets)
                    add(f"{mode}_auc", area)
                    for i, v in enumerate(curve.double().sum(0).tolist()):
                        sums[f"{mode}_curve#{i}"] = sums.get(f"{mode}_curve#{i}", 0.0) + v
    if reduce is not None and world_size > 1:
        sums = reduce(sums)
    if not sums.get("top1#n"):
        raise ValueError("the dataset is empty: nothing to evaluate")
    result = {name: sums[name] / sums[f"{name}#n"] for name in sums if "#" not in name and sums.get(f"{name}#n")}
    for name in ("content_heatmap", "pointing_game", "insertion_auc", "deletion_auc"):
        result.setdefault(name, None)
    for mode in ("insertion", "deletion"):
        points = sorted((int(k.split("#")[1]), v) for k, v in sums.items() if k.startswith(f"{mode}_curve#"))
        if points:
            result[f"{mode}_curve"] = [v / sums[f"{mode}_auc#n"] for _, v in points]
    return result
