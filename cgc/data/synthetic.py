"""``synthetic``: a procedurally generated shape-classification dataset with ground truth
for explanations. No files, no downloads; the same seed always gives the same images.

Each image shows exactly one *class object* (its class is the label and only its shape tells
it: color, size, position and a small rotation are random) on a textured background, among
*distractor objects* (shapes of no class: bars, elongated ellipses, frames) and small clutter
(dots, short strokes). The class object is drawn last, so its mask and box are exact. A
heatmap on the class object is right; on a distractor or the background it is wrong.

Images are made in chunks of :data:`CHUNK` from a generator seeded by (seed, split, chunk),
so image ``i`` of a split does not depend on how many images the split has.
"""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ConfigError, UnknownName

CLASS_SHAPES = (
    "circle",
    "square",
    "triangle",
    "plus",
    "ring",
    "diamond",
    "star",
    "tee",
    "crescent",
    "cross",
    "semicircle",
    "hexagon",
)
DISTRACTOR_SHAPES = ("bar", "ellipse", "frame")
SPLITS = {"train": 0, "val": 1, "test": 2}
CHUNK = 256
#: where the class object lies: anywhere it fits (uniformly), or near the center as in photographs
PLACEMENTS = ("anywhere", "centered")
#: centered placement: the standard deviation of the object's center, as a fraction of the side
CENTERED_STD = 0.06


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (approximately; negative inside) of ``shape`` in object coordinates
    where the shape fills about [-1, 1]^2."""
    r = torch.sqrt(u * u + v * v)
    if shape == "circle":
        return r - 0.9
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.78
    if shape == "triangle":  # equilateral, flat side up (image y grows down), centroid at 0
        d = None
        for ang in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            e = u * math.cos(ang) + v * math.sin(ang) - 0.5
            d = e if d is None else torch.maximum(d, e)
        return d
    if shape in ("plus", "cross"):
        if shape == "cross":
            u, v = (u - v) / math.sqrt(2), (u + v) / math.sqrt(2)
        a = torch.maximum(u.abs() - 0.28, v.abs() - 0.95)
        b = torch.maximum(u.abs() - 0.95, v.abs() - 0.28)
        return torch.minimum(a, b)
    if shape == "ring":
        return (r - 0.68).abs() - 0.24
    if shape == "diamond":
        return (u.abs() + v.abs() - 1.0) / math.sqrt(2)
    if shape == "star":
        a = torch.atan2(v, u) + math.pi / 2
        spikes = torch.cos(5 * a).clamp_min(0) ** 2
        return (r - (0.42 + 0.56 * spikes)) * 0.7
    if shape == "hexagon":
        d = None
        for ang in (0.0, math.pi / 3, 2 * math.pi / 3):
            e = (u * math.cos(ang) + v * math.sin(ang)).abs() - 0.8
            d = e if d is None else torch.maximum(d, e)
        return d
    if shape == "crescent":
        inner = torch.sqrt((u - 0.45) ** 2 + (v + 0.1) ** 2) - 0.72
        return torch.maximum(r - 0.92, -inner)
    if shape == "semicircle":
        return torch.maximum(torch.sqrt(u * u + (v - 0.35) ** 2) - 0.95, v - 0.35)
    if shape == "tee":
        top = torch.maximum(u.abs() - 0.95, (v + 0.65).abs() - 0.25)
        stem = torch.maximum(u.abs() - 0.25, (v - 0.1).abs() - 0.8)
        return torch.minimum(top, stem)
    if shape == "bar":
        return torch.maximum(u.abs() - 1.0, v.abs() - 0.2)
    if shape == "ellipse":
        return (torch.sqrt(u * u + (2.6 * v) ** 2) - 0.95) / 2.6
    if shape == "frame":
        box = torch.maximum(u.abs(), v.abs() * 1.6)
        return (box - 0.8).abs() - 0.12
    raise ValueError(f"unknown shape {shape!r}")


def _rand(gen: torch.Generator, *shape, lo=0.0, hi=1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


def _draw(canvas, shape_ids, names, cx, cy, half, angle, color, S, gen):
    """Composite one object per image onto ``canvas`` [N,3,S,S]; returns the coverage [N,S,S].

    Objects of each shape are evaluated together (vectorised over the images that have it).
    """
    n = canvas.shape[0]
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    cover = torch.zeros(n, S, S)
    for sid, name in enumerate(names):
        idx = (shape_ids == sid).nonzero().flatten()
        if idx.numel() == 0:
            continue
        dx = coords[None, None, :] - cx[idx, None, None]
        dy = coords[None, :, None] - cy[idx, None, None]
        c, s = torch.cos(angle[idx])[:, None, None], torch.sin(angle[idx])[:, None, None]
        u = (c * dx + s * dy) / half[idx, None, None]
        v = (-s * dx + c * dy) / half[idx, None, None]
        d = _sdf(name, u, v) * half[idx, None, None]  # back to pixels: one-pixel soft edge
        cover[idx] = (0.5 - d).clamp(0, 1)
    shade = 1 + 0.08 * torch.randn(n, 1, S, S, generator=gen)
    fill = (color[:, :, None, None] * shade).clamp(0, 1)
    canvas.mul_(1 - cover[:, None]).add_(cover[:, None] * fill)
    return cover


def _background(n: int, S: int, gen: torch.Generator) -> torch.Tensor:
    """Textured backgrounds [n,3,S,S]: a color and a nearby second color mixed by oriented
    stripes and a smooth random field, plus grain. Kept at moderate contrast so that objects
    stand out by luminance while the texture still produces edges everywhere."""
    c1 = _rand(gen, n, 3, 1, 1)
    c2 = (c1 + 0.15 * torch.randn(n, 3, 1, 1, generator=gen)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    theta = _rand(gen, n, 1, 1, hi=math.pi)
    freq = _rand(gen, n, 1, 1, lo=0.1, hi=0.5)
    phase = _rand(gen, n, 1, 1, hi=2 * math.pi)
    stripes = 0.5 + 0.5 * torch.sin(freq * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
    field = torch.nn.functional.interpolate(
        torch.rand(n, 1, 5, 5, generator=gen), size=(S, S), mode="bicubic", align_corners=False
    )[:, 0]
    mix = _rand(gen, n, 1, 1)
    t = (mix * stripes + (1 - mix) * field).clamp(0, 1)[:, None]
    bg = c1 * (1 - t) + c2 * t
    return (bg + 0.03 * torch.randn(n, 3, S, S, generator=gen)).clamp(0, 1)


LUMA = torch.tensor([0.299, 0.587, 0.114])


def _contrasting(bg_mean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random hues [n,3] whose luminance is far from the background's: dark (0.05-0.3) on a
    light background, light (0.7-0.95) on a dark one."""
    n = bg_mean.shape[0]
    col = _rand(gen, n, 3, lo=0.05)
    bg_luma = bg_mean @ LUMA
    target = torch.where(bg_luma > 0.5, _rand(gen, n, lo=0.05, hi=0.3), _rand(gen, n, lo=0.7, hi=0.95))
    # scale the color towards the target luminance: darken multiplicatively, lighten towards white
    luma = col @ LUMA
    dark = col * (target / luma)[:, None]
    light = 1 - (1 - col) * ((1 - target) / (1 - luma).clamp_min(1e-3))[:, None]
    return torch.where((target < luma)[:, None], dark, light).clamp(0, 1)


def class_names(num_classes: int = 10, classes=None) -> tuple[str, ...]:
    """The shapes to classify: ``classes`` (names of :data:`CLASS_SHAPES`, in that order of
    labels), or the first ``num_classes``."""
    if classes is None:
        if not 2 <= num_classes <= len(CLASS_SHAPES):
            raise ConfigError(f"num_classes must be in [2, {len(CLASS_SHAPES)}], got {num_classes}")
        return CLASS_SHAPES[:num_classes]
    classes = tuple(classes)
    unknown = [c for c in classes if c not in CLASS_SHAPES]
    if unknown:
        raise UnknownName("shape", unknown[0], CLASS_SHAPES)
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ConfigError(f"give at least two different shapes, got {list(classes)}")
    return classes


def generate_chunk(
    seed: int,
    split: str,
    chunk: int,
    *,
    num_classes: int = 10,
    image_size: int = 64,
    distractors: tuple[int, int] = (2, 3),
    clutter: tuple[int, int] = (4, 8),
    n: int = CHUNK,
    classes=None,
    placement: str = "anywhere",
):
    """``n`` images of one chunk: uint8 images [n,3,S,S], labels [n], boxes [n,4] as
    (x0, y0, x1, y1) pixel edges, object masks [n,S,S] bool. ``distractors`` and ``clutter``
    are the (min, max) counts of distractor objects and clutter marks per chunk; the class
    objects are the shapes :func:`class_names` gives, placed as ``placement`` says
    (:data:`PLACEMENTS`)."""
    names = class_names(num_classes, classes)
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 pixels, got {image_size}")
    if placement not in PLACEMENTS:
        raise UnknownName("placement", placement, PLACEMENTS)
    S = image_size
    gen = torch.Generator().manual_seed((seed * 7919 + SPLITS[split]) * 1_000_003 + chunk)
    canvas = _background(n, S, gen)
    bg_mean = canvas.mean((2, 3))
    _add_clutter(canvas, clutter, gen)
    _add_distractors(canvas, distractors, bg_mean, gen)
    labels, cover = _add_class_object(canvas, names, bg_mean, placement, gen)
    masks = cover > 0.5
    images = (canvas * 255).round().to(torch.uint8)
    return images, labels, boxes_of(masks), masks


def _add_clutter(canvas: torch.Tensor, counts: tuple[int, int], gen: torch.Generator) -> None:
    """Small dots and strokes, in random colors, anywhere."""
    n, S = canvas.shape[0], canvas.shape[-1]
    for _ in range(int(torch.randint(counts[0], counts[1] + 1, (1,), generator=gen))):
        kind = torch.randint(0, 2, (n,), generator=gen)
        half = _rand(gen, n, lo=0.025, hi=0.05) * S
        x, y = _rand(gen, n, hi=S), _rand(gen, n, hi=S)
        _draw(canvas, kind, ("circle", "bar"), x, y, half, _rand(gen, n, hi=math.pi), _rand(gen, n, 3), S, gen)


def _add_distractors(canvas: torch.Tensor, counts: tuple[int, int], bg_mean: torch.Tensor, gen) -> None:
    """Objects of no class (:data:`DISTRACTOR_SHAPES`), as large and as contrasted as the class
    objects, away from the borders."""
    n, S = canvas.shape[0], canvas.shape[-1]
    for _ in range(int(torch.randint(counts[0], counts[1] + 1, (1,), generator=gen))):
        kind = torch.randint(0, len(DISTRACTOR_SHAPES), (n,), generator=gen)
        half = _rand(gen, n, lo=0.09, hi=0.2) * S
        x, y = _rand(gen, n, lo=0.1, hi=0.9) * S, _rand(gen, n, lo=0.1, hi=0.9) * S
        angle, color = _rand(gen, n, hi=math.pi), _contrasting(bg_mean, gen)
        _draw(canvas, kind, DISTRACTOR_SHAPES, x, y, half, angle, color, S, gen)


def _add_class_object(canvas: torch.Tensor, names, bg_mean: torch.Tensor, placement: str, gen):
    """The class object of each image, on top: ``(labels [n], coverage [n,S,S])``."""
    n, S = canvas.shape[0], canvas.shape[-1]
    labels = torch.randint(0, len(names), (n,), generator=gen)
    half = _rand(gen, n, lo=0.17, hi=0.3) * S
    cx = _place(half, _rand(gen, n), S, placement)
    cy = _place(half, _rand(gen, n), S, placement)
    angle = _rand(gen, n, lo=-0.3, hi=0.3)
    cover = _draw(canvas, labels, names, cx, cy, half, angle, _contrasting(bg_mean, gen), S, gen)
    return labels, cover


def _place(half: torch.Tensor, u: torch.Tensor, S: int, placement: str) -> torch.Tensor:
    """Object centers along one axis from uniform draws ``u``: ``anywhere`` the object fits,
    uniformly; ``centered``: normally around the image center (standard deviation
    :data:`CENTERED_STD` of the side), kept inside the image."""
    if placement == "anywhere":
        return half + u * (S - 2 * half)
    z = math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    return (S / 2 + CENTERED_STD * S * z).clamp(half, S - half)


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes [n,4] (x0, y0, x1, y1 pixel edges) of masks [n,S,S]."""
    S = masks.shape[-1]
    rows, cols = masks.any(2), masks.any(1)
    ar = torch.arange(S)
    y0 = torch.where(rows, ar, S).amin(1)
    y1 = torch.where(rows, ar + 1, 0).amax(1)
    x0 = torch.where(cols, ar, S).amin(1)
    x1 = torch.where(cols, ar + 1, 0).amax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


class SyntheticShapes(torch.utils.data.Dataset):
    """One split of the synthetic dataset, held in memory.

    ``dataset[i]`` is ``(image uint8 [3,S,S], label)``; ``boxes`` [N,1,4] (x0, y0, x1, y1)
    and ``masks`` [N,S,S] are the ground truth of the explanation metrics.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 5000,
        *,
        seed: int = 0,
        num_classes: int = 10,
        image_size: int = 64,
        classes=None,
        placement: str = "anywhere",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"a split needs at least one image, got size={size}")
        chunks = math.ceil(size / CHUNK)

        def chunk(c: int):
            return generate_chunk(
                seed, split, c, num_classes=num_classes, image_size=image_size, classes=classes, placement=placement
            )

        # chunks have their own generators, so threads make the same images; the small tensor ops
        # of one chunk leave the cores idle (on 2 cores: about twice as fast as one by one)
        with ThreadPoolExecutor(max(1, min(chunks, torch.get_num_threads()))) as pool:
            parts = list(pool.map(chunk, range(chunks)))
        images, labels, boxes, masks = (torch.cat(p)[:size] for p in zip(*parts))
        self.images, self.labels, self.masks = images, labels, masks
        self.boxes = boxes[:, None]
        self.classes = list(class_names(num_classes, classes))
        self.image_size = image_size

    def select(self, indices) -> SyntheticShapes:
        """The images ``indices`` with their boxes and masks, e.g. one process's share."""
        view = copy.copy(self)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        view.images, view.labels, view.masks, view.boxes = (
            t[idx] for t in (self.images, self.labels, self.masks, self.boxes)
        )
        return view

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]
