"""cgc: Contrastive Grad-CAM Consistency.

Train image classifiers whose CAM explanations move with the image (crop, resize, flip) by
adding an InfoNCE loss over heatmaps to ordinary training (Pillai et al., CVPR 2022).

- :mod:`cgc.ops`: the differentiable primitives ``gradcam``, ``affine_warp``, ``info_nce``
  with reference / native / Triton backends;
- :class:`cgc.GradCAM`: batched, differentiable CAMs of CNNs and vision transformers (ViT,
  DeiT, Swin, ...: token maps read as spatial maps, :class:`cgc.TokenMap`), with the methods of
  :data:`cgc.CAM_METHODS` (``gradcam``, ``hirescam``, ``gradcam++``, ``xgradcam``,
  ``layercam``; :func:`cgc.register_cam_method` adds one);
- :class:`cgc.CGCTerm` / :func:`cgc.cgc_term`: the whole CGC term for any training loop;
- :class:`cgc.CGCLoss`: the contrastive consistency loss of two heatmaps (and its MSE ablation);
- :mod:`cgc.transforms`: random crop/flip as affine maps; ``python -m cgc.train``.
"""

from importlib import metadata as _metadata

from . import ops, transforms
from .cam import GradCAM, find_target_layer, resize_heatmaps
from .cam_methods import CAM_METHODS, register_cam_method
from .losses import CGCLoss
from .term import CGCOutput, CGCTerm, cgc_term
from .token_maps import TokenMap

try:
    __version__ = _metadata.version("cgc")
except _metadata.PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"
__all__ = [
    "CAM_METHODS",
    "CGCLoss",
    "CGCOutput",
    "CGCTerm",
    "GradCAM",
    "TokenMap",
    "cgc_term",
    "find_target_layer",
    "ops",
    "register_cam_method",
    "resize_heatmaps",
    "transforms",
]
