"""Triton backend: the kernels of ``kernels/`` (imported as :mod:`cgc.kernels`) as PyTorch ops.

Every op is a ``torch.library.triton_op`` in the ``cgc_triton`` namespace, its kernels
launched through ``wrap_triton``, so ``torch.compile`` traces into the kernels instead of
stopping at an opaque call; ``register_autograd`` gives each op its backward, itself a
Triton op. The backward ops of ``gradcam`` and ``affine_warp`` have autograd too (torch
formulas for gradcam, the forward warp for the warp's linear backward), so the heatmap can be
differentiated twice, as the CGC loss does through ``autograd.grad(create_graph=True)``.
``info_nce`` (both forms) is differentiable once.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this
module was first imported (the Triton interpreter: slow, for tests). Needs torch >= 2.6.
"""

# no `from __future__ import annotations`: triton_op infers each op's schema from the
# annotations, which older torch versions read only as real types
import os

import torch

if not hasattr(torch.library, "triton_op"):
    raise ImportError(
        f"the Triton backend needs torch >= 2.6 (torch.library.triton_op); this is torch {torch.__version__}"
    )

# a missing triton surfaces here as the ImportError that cgc.ops reports as the reason
from cgc.kernels import affine_warp as _warp
from cgc.kernels import common as _common
from cgc.kernels import gradcam as _cam
from cgc.kernels import info_nce as _nce

Tensor = torch.Tensor


def unavailable_reason() -> str | None:
    """None when the kernels can run in this process, else why not."""
    if _common.INTERPRETED or torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (
            "TRITON_INTERPRET=1 was set after the Triton kernels had been compiled for the "
            "GPU; set it before cgc.ops.triton is first imported"
        )
    return (
        "no CUDA device is visible; set TRITON_INTERPRET=1 before importing cgc to run the "
        "Triton kernels on the CPU through the (slow) Triton interpreter"
    )


def supports(device: torch.device) -> bool:
    """CUDA tensors always; CPU tensors only under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and _common.INTERPRETED)


# ------------------------------------------------------------------------------------ gradcam
@torch.library.triton_op("cgc_triton::gradcam", mutates_args=())
def _gradcam(activations: Tensor, gradients: Tensor, pool: bool) -> Tensor:
    return _cam.gradcam_forward(activations, gradients, pool)


@torch.library.triton_op("cgc_triton::gradcam_backward", mutates_args=())
def _gradcam_backward(grad_out: Tensor, activations: Tensor, gradients: Tensor, pool: bool) -> tuple[Tensor, Tensor]:
    return _cam.gradcam_backward(grad_out, activations, gradients, pool)


def _gradcam_setup(ctx, inputs, output):
    activations, gradients, pool = inputs
    ctx.save_for_backward(activations, gradients)
    ctx.pool = pool


def _gradcam_grad(ctx, grad):
    activations, gradients = ctx.saved_tensors
    d_act, d_grad = torch.ops.cgc_triton.gradcam_backward(grad, activations, gradients, ctx.pool)
    return d_act, d_grad, None


def _gradcam_backward_setup(ctx, inputs, output):
    grad_out, activations, gradients, pool = inputs
    ctx.save_for_backward(grad_out, activations, gradients)
    ctx.pool = pool


def _gradcam_double_grad(ctx, gg_act, gg_grad):
    """Derivative of ``(dA, dG)`` in differentiable torch ops (the ReLU mask is constant).

    With ``gm = grad_out * mask`` and ``w`` the per-pixel weights (``G`` itself, or channel
    weights broadcast over space): ``dA = w gm`` and ``dw = A gm`` (summed over space for
    channel weights, and spread back as ``/HW`` when pooled from ``G``).
    """
    grad_out, act, grads = ctx.saved_tensors
    pool = ctx.pool
    mask = (torch.ops.cgc_triton.gradcam(act.detach(), grads.detach(), pool) > 0).to(act.dtype)[:, None]
    gm = grad_out[:, None] * mask
    if grads.dim() == 4 and not pool:
        w, gg_w = grads, gg_grad
    elif grads.dim() == 4:
        w = grads.mean((2, 3), keepdim=True)
        gg_w = None if gg_grad is None else gg_grad.mean((2, 3), keepdim=True)
    else:
        w = grads[:, :, None, None]
        gg_w = None if gg_grad is None else gg_grad[:, :, None, None]
    terms = []
    if gg_act is not None:
        terms.append((gg_act * w).sum(1, keepdim=True))
    if gg_w is not None:
        terms.append((gg_w * act).sum(1, keepdim=True))
    d_grad_out = (mask * sum(terms))[:, 0] if terms else None
    d_act = None if gg_w is None else gg_w * gm
    d_grads = None
    if gg_act is not None:
        d_w = gg_act * gm
        if grads.dim() == 4 and not pool:
            d_grads = d_w
        elif grads.dim() == 4:
            d_grads = d_w.mean((2, 3), keepdim=True).expand_as(grads)
        else:
            d_grads = d_w.sum((2, 3))
    return d_grad_out, d_act, d_grads, None


torch.library.register_autograd("cgc_triton::gradcam", _gradcam_grad, setup_context=_gradcam_setup)
torch.library.register_autograd(
    "cgc_triton::gradcam_backward", _gradcam_double_grad, setup_context=_gradcam_backward_setup
)


# -------------------------------------------------------------------------------- affine_warp
@torch.library.triton_op("cgc_triton::affine_warp", mutates_args=())
def _affine_warp(input: Tensor, theta: Tensor, height: int, width: int, border: bool) -> Tensor:
    return _warp.warp_forward(input, theta, height, width, border)


@torch.library.triton_op("cgc_triton::affine_warp_backward", mutates_args=())
def _affine_warp_backward(
    grad_out: Tensor, theta: Tensor, in_height: int, in_width: int, border: bool, dtype: torch.dtype
) -> Tensor:
    return _warp.warp_backward(grad_out, theta, in_height, in_width, border, dtype)


def _warp_setup(ctx, inputs, output):
    input, theta, _, _, border = inputs
    ctx.save_for_backward(theta)
    ctx.in_size = tuple(input.shape[2:])
    ctx.border = border
    ctx.dtype = input.dtype


def _warp_grad(ctx, grad):
    (theta,) = ctx.saved_tensors
    d_input = torch.ops.cgc_triton.affine_warp_backward(grad, theta, *ctx.in_size, ctx.border, ctx.dtype)
    return d_input, None, None, None, None


def _warp_backward_setup(ctx, inputs, output):
    grad_out, theta, _, _, border, _ = inputs
    ctx.save_for_backward(theta)
    ctx.out_size = tuple(grad_out.shape[2:])
    ctx.border = border
    ctx.dtype = grad_out.dtype


def _warp_double_grad(ctx, gg):
    """The backward is linear in ``grad_out`` with the forward warp as its adjoint."""
    (theta,) = ctx.saved_tensors
    d_grad_out = torch.ops.cgc_triton.affine_warp(gg, theta, *ctx.out_size, ctx.border).to(ctx.dtype)
    return d_grad_out, None, None, None, None, None


torch.library.register_autograd("cgc_triton::affine_warp", _warp_grad, setup_context=_warp_setup)
torch.library.register_autograd(
    "cgc_triton::affine_warp_backward", _warp_double_grad, setup_context=_warp_backward_setup
)


# ----------------------------------------------------------------------------------- info_nce
@torch.library.triton_op("cgc_triton::info_nce", mutates_args=())
def _info_nce(anchors: Tensor, positives: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _nce.info_nce_forward(anchors, positives, temperature)


@torch.library.triton_op("cgc_triton::info_nce_backward", mutates_args=())
def _info_nce_backward(
    grad_rows: Tensor, anchors: Tensor, positives: Tensor, temperature: float, lse: Tensor, gram: Tensor, stats: Tensor
) -> tuple[Tensor, Tensor]:
    return _nce.info_nce_backward(grad_rows, anchors, positives, temperature, lse, gram, stats)


def _nce_setup(ctx, inputs, output):
    anchors, positives, temperature = inputs
    _, lse, gram, stats = output
    ctx.save_for_backward(anchors, positives, lse, gram, stats)
    ctx.temperature = temperature


def _nce_grad(ctx, grad_rows, _lse, _gram, _stats):
    anchors, positives, lse, gram, stats = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = torch.zeros_like(lse)
    d_a, d_p = torch.ops.cgc_triton.info_nce_backward(grad_rows, anchors, positives, ctx.temperature, lse, gram, stats)
    return d_a, d_p, None


torch.library.register_autograd("cgc_triton::info_nce", _nce_grad, setup_context=_nce_setup)


@torch.library.triton_op("cgc_triton::info_nce_neg", mutates_args=())
def _info_nce_neg(
    anchors: Tensor, positives: Tensor, negatives: Tensor, anchor_index: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _nce.info_nce_neg_forward(anchors, positives, negatives, anchor_index, temperature)


@torch.library.triton_op("cgc_triton::info_nce_neg_backward", mutates_args=())
def _info_nce_neg_backward(
    grad_rows: Tensor,
    anchors: Tensor,
    positives: Tensor,
    negatives: Tensor,
    anchor_index: Tensor,
    temperature: float,
    lse: Tensor,
    gram: Tensor,
    stats: Tensor,
    nsq: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _nce.info_nce_neg_backward(
        grad_rows, anchors, positives, negatives, anchor_index, temperature, lse, gram, stats, nsq
    )


def _nce_neg_setup(ctx, inputs, output):
    anchors, positives, negatives, anchor_index, temperature = inputs
    _, lse, gram, stats, nsq = output
    ctx.save_for_backward(anchors, positives, negatives, anchor_index, lse, gram, stats, nsq)
    ctx.temperature = temperature


def _nce_neg_grad(ctx, grad_rows, _lse, _gram, _stats, _nsq):
    anchors, positives, negatives, anchor_index, lse, gram, stats, nsq = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = torch.zeros_like(lse)
    d_a, d_p, d_n = torch.ops.cgc_triton.info_nce_neg_backward(
        grad_rows, anchors, positives, negatives, anchor_index, ctx.temperature, lse, gram, stats, nsq
    )
    return d_a, d_p, d_n, None, None


torch.library.register_autograd("cgc_triton::info_nce_neg", _nce_neg_grad, setup_context=_nce_neg_setup)


# ---------------------------------------------------------------------- the backend interface
def gradcam(activations: Tensor, gradients: Tensor, pool: bool) -> Tensor:
    """See :func:`cgc.ops.gradcam`."""
    return torch.ops.cgc_triton.gradcam(activations, gradients, pool)


def affine_warp(input: Tensor, theta: Tensor, size: tuple[int, int], padding_mode: str) -> Tensor:
    """See :func:`cgc.ops.affine_warp`."""
    return torch.ops.cgc_triton.affine_warp(input, theta, size[0], size[1], padding_mode == "border")


def info_nce(anchors: Tensor, positives: Tensor, temperature: float, reduction: str) -> Tensor:
    """See :func:`cgc.ops.info_nce`: per-row losses from the kernels (accumulation dtype),
    reduced here and returned in the input dtype."""
    rows = torch.ops.cgc_triton.info_nce(anchors, positives, temperature)[0]
    return _reduce(rows, reduction).to(anchors.dtype)


def info_nce_neg(
    anchors: Tensor, positives: Tensor, negatives: Tensor, anchor_index: Tensor, temperature: float, reduction: str
) -> Tensor:
    """See :func:`cgc.ops.info_nce` with ``negatives``: reduced as :func:`info_nce`."""
    rows = torch.ops.cgc_triton.info_nce_neg(anchors, positives, negatives, anchor_index, temperature)[0]
    return _reduce(rows, reduction).to(anchors.dtype)


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
