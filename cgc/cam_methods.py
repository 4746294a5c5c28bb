"""CAM methods as differentiable training targets, in a registry.

Every gradient-based CAM of a layer's activations ``A`` [B,K,H,W] and gradients
``G = d score / d A`` is ``relu(sum_k w_k * A_k)`` for some weights ``w``: channel weights
[B,K] (pytorch-grad-cam's ``get_cam_weights`` override point) or per-pixel weights
[B,K,H,W] (its ``get_cam_image``). A method here is one function ``(A, G) -> (w, pool)``;
the heatmap is always the fused op :func:`cgc.ops.gradcam` (weighting + ReLU in one kernel),
with ``pool=True`` averaging 4-D weights over space inside the kernel. Everything is written
in differentiable torch ops, so ``create_graph=True`` trains through any method.

A new method is a few lines::

    @cgc.register_cam_method("mycam")
    def mycam(A, G):
        return G.abs().mean((2, 3)), False
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import UnknownName

#: a method: (activations [B,K,H,W], gradients [B,K,H,W]) -> (weights [B,K] or [B,K,H,W], pool)
CAMMethod = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, bool]"]

CAM_METHODS: dict[str, CAMMethod] = {}


def register_cam_method(name: str):
    """Decorator: register ``fn(A, G) -> (weights, pool)`` as the CAM method ``name``."""

    def add(fn: CAMMethod) -> CAMMethod:
        if name in CAM_METHODS:
            raise ValueError(f"a CAM method called {name!r} is already registered")
        CAM_METHODS[name] = fn
        return fn

    return add


def get_cam_method(name: str) -> CAMMethod:
    """The registered method ``name`` (:class:`cgc.errors.UnknownName` with suggestions if absent)."""
    try:
        return CAM_METHODS[name]
    except KeyError:
        raise UnknownName("CAM method", name, CAM_METHODS) from None


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Float32 for 16-bit inputs: the methods below square and cube gradients and divide by
    sums, which bfloat16 would round or flush to zero."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@register_cam_method("gradcam")
def gradcam(A: torch.Tensor, G: torch.Tensor):
    """Grad-CAM (Selvaraju et al.): channel weights = spatial mean of the gradients."""
    return G, True


@register_cam_method("hirescam")
def hirescam(A: torch.Tensor, G: torch.Tensor):
    """HiResCAM (Draelos & Carin): gradient x activation element-wise, summed over channels;
    what the CGC authors train with. Equals Grad-CAM when global average pooling and a
    linear layer follow the target layer (ResNets, the compact model)."""
    return G, False


@register_cam_method("gradcam++")
def gradcam_plus_plus(A: torch.Tensor, G: torch.Tensor):
    """Grad-CAM++ (Chattopadhyay et al., eq. 19 with exponential scores, as pytorch-grad-cam):
    ``w_k = sum_ij relu(G) * alpha``, ``alpha = G^2 / (2 G^2 + sum_ij(A) G^3)`` (0 where G = 0)."""
    a, g = _wide(A), _wide(G)
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    return (g.clamp_min(0) * alpha).sum((2, 3)).to(A.dtype), False


@register_cam_method("xgradcam")
def xgradcam(A: torch.Tensor, G: torch.Tensor):
    """XGrad-CAM (Fu et al.): ``w_k = sum_ij G * A / sum_ij A``."""
    a, g = _wide(A), _wide(G)
    return (g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3)).to(A.dtype), False


@register_cam_method("layercam")
def layercam(A: torch.Tensor, G: torch.Tensor):
    """LayerCAM (Jiang et al.): per-pixel weights ``relu(G)``."""
    return G.clamp_min(0), False
