"""cgc: Contrastive Grad-CAM Consistency.

Train image classifiers whose Grad-CAM explanations move with the image (crop, resize,
flip) by adding an InfoNCE loss over heatmaps to ordinary training (Pillai et al., CVPR 2022).

- :mod:`cgc.ops`: the differentiable primitives ``gradcam``, ``affine_warp``, ``info_nce``
  with reference / native / Triton backends;
- :class:`cgc.GradCAM`: batched, differentiable Grad-CAM of any CNN;
- :class:`cgc.CGCLoss`: the contrastive consistency loss (and its MSE ablation);
- :mod:`cgc.transforms`: random crop/flip as affine maps; ``python -m cgc.train``.
"""
from . import ops, transforms
from .cam import GradCAM, find_target_layer, resize_heatmaps
from .losses import CGCLoss

__version__ = "0.1.0"
__all__ = ["ops", "transforms", "GradCAM", "CGCLoss", "find_target_layer", "resize_heatmaps"]
