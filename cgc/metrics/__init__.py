"""Batched metrics of classifiers and their explanations, on the tensors' device (protocols:
docs/method.md; the groups are Quantus's):

- accuracy: :func:`topk_correct`;
- localization: :func:`content_heatmap` (relevance mass), :func:`pointing_game`, on regions from
  :func:`box_region` or masks;
- faithfulness: :func:`insertion_deletion` (RISE's insertion / deletion curves and AUCs);
- consistency under crop/flip: :func:`consistency`;
- robustness: :func:`max_sensitivity`;
- complexity: :func:`sparseness` (Gini), :func:`complexity` (entropy);
- randomization (sanity checks): :func:`randomization_steps`, :func:`randomized_models`,
  :func:`other_classes`, with the similarities :func:`spearman`, :func:`ssim`, :func:`cosine`,
  :func:`topk_iou`;
- all of them as objects over a dataset: :data:`METRICS`, :func:`explanation_metrics`.

The functions that run a model put it in eval mode for the measurement and restore the mode it
had (the reference insertion script left models in train mode, corrupting BatchNorm statistics);
none changes a value of the model.
"""

from .common import box_region, eval_batches, eval_mode, topk_correct
from .complexity import complexity, sparseness
from .consistency import consistency
from .faithfulness import REFERENCE_STEPS, auc, gaussian_blur, insertion_deletion
from .localization import center_heatmaps, content_heatmap, off_center, pointing_game
from .randomization import (
    GRANULARITIES,
    by_max,
    model_randomization,
    other_classes,
    random_logit,
    randomization_steps,
    randomized_models,
)
from .robustness import keyed_noise, max_sensitivity
from .similarity import cosine, spearman, ssim, topk_iou
from .suite import (
    METRICS,
    TRAINING_METRICS,
    EvalBatch,
    Metric,
    MetricsConfig,
    explanation_metrics,
    register_metric,
    select,
)

__all__ = [
    "GRANULARITIES",
    "METRICS",
    "REFERENCE_STEPS",
    "TRAINING_METRICS",
    "EvalBatch",
    "Metric",
    "MetricsConfig",
    "auc",
    "box_region",
    "by_max",
    "center_heatmaps",
    "complexity",
    "consistency",
    "content_heatmap",
    "cosine",
    "eval_batches",
    "eval_mode",
    "explanation_metrics",
    "gaussian_blur",
    "insertion_deletion",
    "keyed_noise",
    "max_sensitivity",
    "model_randomization",
    "off_center",
    "other_classes",
    "pointing_game",
    "random_logit",
    "randomization_steps",
    "randomized_models",
    "register_metric",
    "select",
    "sparseness",
    "spearman",
    "ssim",
    "topk_correct",
    "topk_iou",
]
