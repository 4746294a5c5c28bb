"""Metrics as objects: one small protocol, a registry, and the loop that runs any list of them
over a dataset, batched on the device and shared out over processes.

A :class:`Metric` says its report key (``name``), table ``label``, direction
(``higher_is_better``), what it ``needs`` (``labels``, ``boxes``), whether it is ``slow``, and
how it turns one batch into sums (:meth:`Metric.update`) and the sums into numbers
(:meth:`Metric.finish`). :func:`explanation_metrics` runs the chosen ones; ``cgc.evaluate``'s
rows, ``report.json``, ``report.md`` and the tables come from :data:`METRICS`, so a new metric is
one class with :func:`register_metric`. Heatmaps that several metrics use (the explained
classes' CAMs at input resolution) are computed once per batch (:class:`EvalBatch`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import data, transforms
from ..cam import CAM, resize_heatmaps
from ..errors import UnknownName
from ..progress import progress
from ..settings import Settings, area_range, at_least, non_negative, positive, setting
from ..structure import logits_of
from .common import box_region, eval_batches, eval_mode, topk_correct
from .complexity import complexity, sparseness
from .consistency import consistency
from .faithfulness import insertion_deletion
from .localization import center_heatmaps, content_heatmap, off_center, pointing_game
from .randomization import GRANULARITIES, model_randomization, random_logit, randomization_steps
from .robustness import keyed_noise, max_sensitivity

GROUP = "metrics"


@dataclass(frozen=True)
class MetricsConfig(Settings):
    """The protocols' parameters (defaults: docs/method.md's and Quantus's, see
    docs/evaluation.md): the settings section of ``python -m cgc.evaluate``'s metrics."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP,)

    causal_batch: int = setting(
        256, "insertion/deletion and max-sensitivity: images per forward pass (bounds memory)", GROUP, check=at_least(1)
    )
    pixels_per_step: int | None = setting(
        None, "insertion/deletion: pixels per step (default: H*W/28, RISE's 224*8 at 224 px)", GROUP, check=at_least(1)
    )
    tolerance: float = setting(
        0.0, "pointing game tolerance in pixels (the original game used 15 at 224 px)", GROUP, check=non_negative
    )
    cam_input_size: int | None = setting(
        None,
        "content heatmap / pointing game: resize images to this size for the CAM and the heatmap back "
        "(the ImageNet protocol: 448; default: no resizing)",
        GROUP,
        check=at_least(1),
    )
    crop_scale: tuple[float, float] = setting(
        transforms.DEFAULT_SCALE,
        "consistency: area range of the random crops",
        GROUP,
        check=area_range,
        metavar=("MIN", "MAX"),
    )
    sensitivity_radius: float = setting(
        0.2,
        "max-sensitivity: uniform noise in [-r, r] per normalized input value (Quantus's default)",
        GROUP,
        check=positive,
    )
    sensitivity_samples: int = setting(10, "max-sensitivity: noise samples per image", GROUP, check=at_least(1))
    randomization: str = setting(
        "stage",
        "MPRT steps: the model's top-level blocks from the head down (Adebayo et al.), or every module with "
        "reset_parameters (Quantus)",
        GROUP,
        choices=GRANULARITIES,
    )
    metric_seed: int = setting(
        12345, "seed of the metrics' random draws (crops, noise, classes, randomized weights)", GROUP
    )


@dataclass
class EvalBatch:
    """One batch of evaluation images with what several metrics share, computed on demand."""

    cam: CAM
    x: torch.Tensor  # normalized images [B,C,H,W]
    labels: torch.Tensor
    boxes: torch.Tensor | None
    indices: list[int]  # the images' positions in the dataset (their keys)
    settings: MetricsConfig
    cache: dict = field(default_factory=dict)

    def get(self, name: str, make):
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.x.shape[-2:])

    @property
    def logits(self) -> torch.Tensor:
        def run():
            with torch.no_grad():
                return logits_of(self.cam.model(self.x))

        return self.get("logits", run)

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def heatmaps(self) -> torch.Tensor:
        """CAMs of the predicted classes at input resolution [B,H,W] (float32)."""
        return self.get("heatmaps", lambda: self.explain(self.x, self.predicted))

    def explain(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CAMs of ``images`` for ``targets`` at input resolution."""
        return resize_heatmaps(self.cam(images, targets).cams.float(), tuple(images.shape[-2:]))

    def explain_with(self, model, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same CAM method and layer on another model (a randomized copy)."""
        if model is self.cam.model:
            return self.explain(images, targets)
        with self.cam.with_model(model) as cam:
            return resize_heatmaps(cam(images, targets).cams.float(), tuple(images.shape[-2:]))

    @property
    def region(self) -> torch.Tensor:
        return self.get("region", lambda: box_region(self.boxes.to(self.x.device).float(), self.size))

    def keys(self, purpose: str) -> list[int]:
        return transforms.sample_keys(self.settings.metric_seed, 0, self.indices, purpose)


class Metric(ABC):
    """One row of the evaluation. ``update`` returns per-batch sums (``{"sum": s, "n": n}`` for
    a mean over images; more entries for extra outputs); ``finish`` turns the totals into
    ``{name: value, ...}`` (default: ``sum / n``, None when no image counted)."""

    name: ClassVar[str]
    label: ClassVar[str]
    higher_is_better: ClassVar[bool | None] = None
    needs: ClassVar[frozenset] = frozenset()
    slow: ClassVar[bool] = False
    fmt: ClassVar[str] = ".4f"
    about: ClassVar[str] = ""

    @abstractmethod
    def update(self, batch: EvalBatch) -> dict[str, float]:
        """Sums over this batch's images."""

    def finish(self, totals: dict[str, float]) -> dict:
        n = totals.get("n", 0)
        return {self.name: totals["sum"] / n if n else None}

    @staticmethod
    def mean_of(values: torch.Tensor, scale: float = 1.0) -> dict[str, float]:
        """Sums of the finite per-image values (NaN marks an image the metric cannot score)."""
        v = values.double()
        ok = torch.isfinite(v)
        return {"sum": scale * float(v[ok].sum()), "n": float(ok.sum())}

    @property
    def arrow(self) -> str:
        return {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]


#: name -> metric class, in the order of the table
METRICS: dict[str, type[Metric]] = {}
#: the explanation metrics every training run measures at its end (the rest: ``cgc.evaluate``)
TRAINING_METRICS = ("consistency", "consistency_iou", "content_heatmap", "pointing_game")


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: add a metric to :data:`METRICS` (its ``name`` must be new)."""
    if cls.name in METRICS:
        raise ValueError(f"a metric called {cls.name!r} is already registered")
    METRICS[cls.name] = cls
    return cls


def select(names: list[str] | None = None, *, skip_slow: bool = False, has_boxes: bool = True) -> list[Metric]:
    """Instances of the metrics ``names`` (default: all), without the slow ones with
    ``skip_slow`` and without those needing boxes when the data has none."""
    chosen = names if names else list(METRICS)
    for name in chosen:
        if name not in METRICS:
            raise UnknownName("metric", name, METRICS)
    out = [METRICS[n]() for n in chosen]
    return [m for m in out if not (skip_slow and m.slow) and (has_boxes or "boxes" not in m.needs)]


# ----------------------------------------------------------------------------- the metrics
class _TopK(Metric):
    k: ClassVar[int]
    needs = frozenset({"labels"})
    higher_is_better = True
    fmt = ".2f"

    def update(self, batch):
        return {
            "sum": 100.0 * topk_correct(batch.logits, batch.labels, ks=(self.k,))[self.k],
            "n": float(batch.labels.shape[0]),
        }


@register_metric
class Top1(_TopK):
    name, label, k, about = "top1", "top-1 (%)", 1, "accuracy"


@register_metric
class Top5(_TopK):
    name, label, k, about = "top5", "top-5 (%)", 5, "accuracy"


class _LabelHeatmaps(Metric):
    """Localization metrics: CAMs of the ground-truth class, on the image resized to
    ``cam_input_size`` (the ImageNet protocol of docs/method.md: 448) and back; images without a
    box left out."""

    needs = frozenset({"labels", "boxes"})
    higher_is_better = True
    fmt = ".2f"

    @staticmethod
    def heatmaps_for(batch: EvalBatch, targets: torch.Tensor) -> torch.Tensor:
        """CAMs of ``targets`` on the batch's images resized to ``cam_input_size``, brought back
        to the images' size."""
        x, size = batch.x, batch.settings.cam_input_size
        xin = (
            x if size is None else F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
        )
        return resize_heatmaps(batch.cam(xin, targets).cams.float(), batch.size)

    @staticmethod
    def label_heatmaps(batch: EvalBatch) -> torch.Tensor:
        return batch.get("label_heatmaps", lambda: _LabelHeatmaps.heatmaps_for(batch, batch.labels))


@register_metric
class ContentHeatmap(_LabelHeatmaps):
    name, label = "content_heatmap", "content heatmap (%)"
    about = "energy of the label's heatmap inside the boxes (Quantus: relevance mass accuracy x 100)"

    def update(self, batch):
        has = batch.region.flatten(1).any(1)
        return self.mean_of(content_heatmap(self.label_heatmaps(batch), batch.region)[has])


@register_metric
class PointingGame(_LabelHeatmaps):
    name, label = "pointing_game", "pointing game (%)"
    about = "the label's heatmap peaks inside a box"

    def update(self, batch):
        has = batch.region.flatten(1).any(1)
        hits = pointing_game(self.label_heatmaps(batch), batch.region, batch.settings.tolerance)
        return self.mean_of(hits[has].double(), 100.0)


@register_metric
class PointingGameOffCenter(_LabelHeatmaps):
    name, label = "pointing_game_off_center", "pointing game, off-center objects (%)"
    about = "the same, on the objects whose center is more than a quarter side from the image's"

    def update(self, batch):
        keep = batch.region.flatten(1).any(1) & off_center(batch.boxes, batch.size).to(batch.x.device)
        hits = pointing_game(self.label_heatmaps(batch), batch.region, batch.settings.tolerance)
        return self.mean_of(hits[keep].double(), 100.0)


@register_metric
class PointingGameCenter(Metric):
    name, label = "pointing_game_center", "pointing game, center baseline (%)"
    needs = frozenset({"boxes"})
    fmt = ".2f"
    about = "a Gaussian at the image center for every image: what knowing where objects tend to be scores"

    def update(self, batch):
        has = batch.region.flatten(1).any(1)
        center = center_heatmaps(batch.x.shape[0], batch.size, batch.x.device)
        hits = pointing_game(center, batch.region, batch.settings.tolerance).double()
        far = has & off_center(batch.boxes, batch.size).to(batch.x.device)
        out = self.mean_of(hits[has], 100.0)
        off = self.mean_of(hits[far], 100.0)
        return out | {"off_sum": off["sum"], "off_n": off["n"]}

    def finish(self, totals):
        out = super().finish(totals)
        n = totals.get("off_n", 0)
        return out | {"pointing_game_center_off_center": totals["off_sum"] / n if n else None}


@register_metric
class ClassSpecificity(Metric):
    name, label, higher_is_better = "class_specificity", "class-specificity (1 - cos)", True
    needs = frozenset({"labels"})
    about = "1 - cosine of the label's heatmap and the runner-up class's, on the same image"

    def update(self, batch):
        runner_up = batch.logits.float().scatter(1, batch.labels[:, None], float("-inf")).argmax(1)
        a = _LabelHeatmaps.label_heatmaps(batch).clamp_min(0).flatten(1).double()
        b = _LabelHeatmaps.heatmaps_for(batch, runner_up).clamp_min(0).flatten(1).double()
        norms = a.norm(dim=1) * b.norm(dim=1)
        cos = torch.where(norms > 0, (a * b).sum(1) / norms.clamp_min(1e-300), torch.nan)  # a blank map: unscored
        return self.mean_of(1 - cos)


class _Causal(Metric):
    mode: ClassVar[str]
    slow = True

    def update(self, batch):
        s = batch.settings
        area, curve = insertion_deletion(
            batch.cam.model,
            batch.x,
            batch.heatmaps,
            mode=self.mode,
            step=s.pixels_per_step,
            batch_size=s.causal_batch,
            targets=batch.predicted,
        )
        out = self.mean_of(area)
        out.update({f"curve{i}": v for i, v in enumerate(curve.double().sum(0).tolist())})
        return out

    def finish(self, totals):
        out = super().finish(totals)
        points = sorted((int(k[5:]), v) for k, v in totals.items() if k.startswith("curve"))
        out[f"{self.mode}_curve"] = [v / totals["n"] for _, v in points] if points and totals["n"] else None
        return out


@register_metric
class Insertion(_Causal):
    name, label, mode, higher_is_better = "insertion_auc", "insertion AUC", "insertion", True
    about = "RISE: probability of the predicted class as its most salient pixels come back"


@register_metric
class Deletion(_Causal):
    name, label, mode, higher_is_better = "deletion_auc", "deletion AUC", "deletion", False
    about = "RISE: probability as its most salient pixels are removed"


class _Consistency(Metric):
    higher_is_better = True

    @staticmethod
    def pair(batch: EvalBatch):
        def make():
            keys = batch.keys("consistency")
            tf = transforms.random_crop_flip(batch.x.shape[0], *batch.size, scale=batch.settings.crop_scale, keys=keys)
            return consistency(batch.cam, batch.x, tf.theta().to(batch.x.device))

        return batch.get("consistency", make)


@register_metric
class ConsistencyCosine(_Consistency):
    name, label = "consistency", "consistency (cosine)"
    about = "heatmap of a crop/flip vs the same crop/flip of the heatmap"

    def update(self, batch):
        return self.mean_of(self.pair(batch)[0])


@register_metric
class ConsistencyIoU(_Consistency):
    name, label = "consistency_iou", "consistency (top-20% IoU)"
    about = "the same, as IoU of the top-20 % pixels"

    def update(self, batch):
        return self.mean_of(self.pair(batch)[1])


@register_metric
class MaxSensitivity(Metric):
    name, label, higher_is_better, slow = "max_sensitivity", "max-sensitivity", False, True
    about = "largest relative change of the heatmap under uniform input noise (Yeh et al.)"

    def update(self, batch):
        s = batch.settings
        noise = keyed_noise(s.metric_seed, batch.indices, tuple(batch.x.shape[1:]), s.sensitivity_radius)
        worst = max_sensitivity(
            batch.explain, batch.x, batch.predicted, noise, samples=s.sensitivity_samples, batch_size=s.causal_batch
        )
        return self.mean_of(worst)


@register_metric
class Sparseness(Metric):
    name, label, higher_is_better = "sparseness", "sparseness (Gini)", True
    about = "Gini index of the heatmap: 0 uniform, 1 one pixel (Chalasani et al.)"

    def update(self, batch):
        return self.mean_of(sparseness(batch.heatmaps))


@register_metric
class Complexity(Metric):
    name, label, higher_is_better = "complexity", "complexity (entropy)", False
    about = "entropy of the heatmap's mass: 0 one pixel, log(H*W) uniform (Bhatt et al.)"

    def update(self, batch):
        return self.mean_of(complexity(batch.heatmaps))


@register_metric
class RandomLogit(Metric):
    name, label, higher_is_better = "random_logit", "random logit (SSIM)", False
    about = "SSIM of the predicted class's heatmap and a random other class's (Sixt et al.)"

    def update(self, batch):
        return self.mean_of(
            random_logit(
                batch.cam.model,
                batch.explain_with,
                batch.x,
                batch.predicted,
                batch.logits.shape[1],
                batch.keys("random_logit"),
                original=batch.heatmaps,
            )
        )


@register_metric
class ModelRandomization(Metric):
    name, label, higher_is_better, slow = "mprt", "MPRT (Spearman)", False, True
    about = (
        "cascading model parameter randomization (Adebayo et al.): rank correlation of the heatmap "
        "before and after each step, mean over the steps"
    )

    def update(self, batch):
        s = batch.settings
        model = batch.cam.model
        steps = batch.get("mprt_steps", lambda: randomization_steps(model, s.randomization, batch.size[0]))
        self.step_names, rho, sim = model_randomization(
            model, batch.explain_with, batch.x, batch.predicted, steps, seed=s.metric_seed, original=batch.heatmaps
        )
        out = self.mean_of(rho)
        for k in range(rho.shape[0]):
            for key, values in (("rho", rho[k]), ("ssim", sim[k])):
                part = self.mean_of(values)
                out[f"{key}{k}"], out[f"{key}_n{k}"] = part["sum"], part["n"]
        return out

    def finish(self, totals):
        out = super().finish(totals)
        steps = sum(1 for k in totals if k.startswith("rho_n"))
        for key, report in (("rho", "mprt_steps"), ("ssim", "mprt_ssim_steps")):
            out[report] = [
                totals[f"{key}{k}"] / totals[f"{key}_n{k}"] if totals[f"{key}_n{k}"] else None for k in range(steps)
            ]
        out["mprt_step_names"] = list(getattr(self, "step_names", []))
        return out


# ----------------------------------------------------------------------------- the loop
def explanation_metrics(
    cam: CAM,
    dataset,
    device,
    *,
    metrics: list[Metric] | None = None,
    settings: MetricsConfig = MetricsConfig(),
    batch_size: int = 64,
    limit: int | None = None,
    workers: int = 0,
    desc: str | None = None,
    job=None,
    label_map: torch.Tensor | None = None,
) -> dict:
    """Run ``metrics`` (default: every registered one) for the model of ``cam`` over
    ``dataset`` (or its first ``limit`` images), in eval mode (restored afterwards):
    ``{report key: value}``, None where a metric had nothing to score (the localization
    metrics on a dataset without boxes).

    Under torchrun (``job``: the :class:`cgc.distributed.Context`) process ``rank`` of
    ``world_size`` measures every ``world_size``-th image and the totals are summed over the
    processes (``job.sum_values``), so every process returns the numbers of the whole dataset. Random draws (crops, noise, classes) are
    keyed by ``settings.metric_seed`` and each image's index: the same for every model and any split.
    ``label_map`` turns the dataset's labels into the model's class indices (a model trained
    elsewhere, e.g. on ImageNet's 1000 classes).
    """
    rank, world_size = (job.rank, job.world_size) if job is not None else (0, 1)
    has_boxes = hasattr(dataset, "boxes")
    metrics = select() if metrics is None else metrics
    unscored = [m.name for m in metrics if "boxes" in m.needs and not has_boxes]  # reported as None
    metrics = [m for m in metrics if m.name not in unscored]
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if not n:
        raise ValueError("the dataset is empty: nothing to evaluate")
    positions = list(range(rank, n, world_size))
    batches = eval_batches(data.take(dataset, positions), batch_size, workers=workers)
    if desc:
        batches = progress(batches, desc, total=math.ceil(len(positions) / batch_size), disable=rank != 0)
    totals: dict[str, float] = {}
    done = 0
    with eval_mode(cam.model):
        for images, labels, boxes in batches:
            if label_map is not None:
                labels = label_map[labels]
            batch = EvalBatch(
                cam,
                data.normalize(images.to(device)),
                labels.to(device),
                boxes,
                positions[done : done + images.shape[0]],
                settings,
            )
            done += images.shape[0]
            for m in metrics:
                for k, v in m.update(batch).items():
                    totals[f"{m.name}/{k}"] = totals.get(f"{m.name}/{k}", 0.0) + v
    if world_size > 1:
        totals = job.sum_values(totals)
    result = dict.fromkeys(unscored)
    for m in metrics:
        mine = {k.split("/", 1)[1]: v for k, v in totals.items() if k.startswith(m.name + "/")}
        result.update(m.finish(mine) if mine.get("n") else {m.name: None})
    return result
