"""cgc: Contrastive Grad-CAM Consistency.

Train image classifiers whose CAM explanations move with the image (crop, resize, flip) by
adding an InfoNCE loss over heatmaps to ordinary training (Pillai et al., CVPR 2022).

- :mod:`cgc.ops`: the differentiable primitives ``gradcam``, ``affine_warp``, ``info_nce``
  with reference / native / Triton backends;
- :class:`cgc.CAM` (also ``cgc.GradCAM``): batched, differentiable CAMs of CNNs and vision
  transformers (ViT, DeiT, Swin, ...: token maps read as spatial maps, :class:`cgc.TokenMap`),
  with the methods of :data:`cgc.CAM_METHODS` (``gradcam``, ``hirescam``, ``gradcam++``,
  ``xgradcam``, ``layercam``; :func:`cgc.register_cam_method` adds one) at the layer
  :func:`cgc.find_target_layer` picks (:mod:`cgc.structure`: what cgc knows of models);
- :class:`cgc.CGCTerm` / :func:`cgc.cgc_term`: the whole CGC term for any training loop;
- :class:`cgc.CGCLoss`: the contrastive consistency loss of two heatmaps (and its MSE ablation);
- :class:`cgc.TermGate`: cross-entropy first, the term switched on once the classifier predicts;
- :mod:`cgc.transforms`: random crop/flip as affine maps; ``python -m cgc.train``.
"""

from importlib import metadata as _metadata

from . import ops, transforms
from .cam import CAM, GradCAM, resize_heatmaps
from .cam_methods import CAM_METHODS, register_cam_method
from .losses import CGCLoss
from .schedule import TermGate
from .structure import TokenMap, find_target_layer
from .term import CGCOutput, CGCTerm, bounded_lambda, cgc_term

try:
    __version__ = _metadata.version("cgc")
except _metadata.PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"
__all__ = [
    "CAM",
    "CAM_METHODS",
    "CGCLoss",
    "CGCOutput",
    "CGCTerm",
    "GradCAM",
    "TermGate",
    "TokenMap",
    "bounded_lambda",
    "cgc_term",
    "find_target_layer",
    "ops",
    "register_cam_method",
    "resize_heatmaps",
    "transforms",
]
