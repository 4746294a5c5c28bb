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
- :class:`cgc.TermConfig`: the term's settings in one section (the CLI's, your loop's, the
  trainers'); :class:`cgc.Safeguards`: what a training loop applies around the term (the gate
  :class:`cgc.TermGate`: cross-entropy first; λ's ramp; the CAMs' class; the gradient bound);
- :mod:`cgc.transforms`: random crop/flip as affine maps; ``python -m cgc.train``.
"""

from importlib import metadata as _metadata

from . import ops, transforms
from .cam import CAM, GradCAM, resize_heatmaps
from .cam_methods import CAM_METHODS, register_cam_method
from .gate import TermGate
from .losses import CGCLoss
from .models import find_target_layer
from .safeguards import Safeguards, bounded_lambda
from .structure import TokenMap
from .term import CGCOutput, CGCTerm, cgc_term
from .term_config import TermConfig

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
    "Safeguards",
    "TermConfig",
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
