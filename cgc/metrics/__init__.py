"""Batched metrics of classifiers and their explanations, on the tensors' device (protocols:
METHOD.md; the groups are Quantus's):

- accuracy: :func:`topk_correct`;
- localisation: :func:`content_heatmap` (relevance mass), :func:`pointing_game`, on regions from
  :func:`box_region` or masks;
- faithfulness: :func:`insertion_deletion` (RISE's insertion / deletion curves and AUCs);
- consistency under crop/flip: :func:`consistency`;
- robustness: :func:`max_sensitivity`;
- complexity: :func:`sparseness` (Gini), :func:`complexity` (entropy);
- randomisation (sanity checks): :func:`randomisation_steps`, :func:`randomised_models`,
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
from .localisation import content_heatmap, pointing_game
from .randomisation import (GRANULARITIES, by_max, model_randomisation, other_classes, random_logit,
                            randomisation_steps, randomised_models)
from .robustness import keyed_noise, max_sensitivity
from .similarity import cosine, spearman, ssim, topk_iou
from .suite import METRICS, EvalBatch, Metric, Settings, explanation_metrics, register_metric, select

__all__ = ["box_region", "eval_batches", "eval_mode", "topk_correct", "complexity", "sparseness", "consistency",
           "REFERENCE_STEPS", "auc", "gaussian_blur", "insertion_deletion", "content_heatmap", "pointing_game",
           "GRANULARITIES", "by_max", "model_randomisation", "other_classes", "random_logit", "randomisation_steps",
           "randomised_models", "keyed_noise",
           "max_sensitivity", "cosine", "spearman", "ssim", "topk_iou", "METRICS", "EvalBatch", "Metric", "Settings",
           "explanation_metrics", "register_metric", "select"]
