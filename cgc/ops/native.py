"""The ``native`` backend: the compiled kernels of ``cgc._C`` (``csrc/``) as ``torch.ops.cgc``.

Each op is a forward/backward pair of custom operators with a C++ kernel per device; this
module registers their autograd formulas (:func:`torch.library.register_autograd`) and their
fake implementations (:func:`torch.library.register_fake`, output shapes for
``torch.compile``), and exposes the backend interface of :mod:`cgc.ops`.

Differentiability: ``gradcam`` to any order (its backward op has its own autograd, needed
because the CGC loss differentiates a heatmap built from ``create_graph`` gradients);
``affine_warp`` to any order (forward and backward are each other's transpose); ``info_nce``
to first order (its backward raises if differentiated again: use the reference for that).
"""
from __future__ import annotations

import torch

try:
    from cgc import _C  # noqa: F401  (loading the library registers torch.ops.cgc)
except ImportError as err:  # not built: ``pip install --no-build-isolation -e .``
    _IMPORT_ERROR: str | None = (f"the extension cgc._C is not built or cannot be loaded ({err}); "
                                 "build it with `pip install --no-build-isolation -e .`")
else:
    _IMPORT_ERROR = None

PADDING = {"zeros": 0, "border": 1}
REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def unavailable_reason() -> str | None:
    """Why this backend cannot run in this process, or None when it can."""
    return _IMPORT_ERROR


def supports(device: torch.device) -> bool:
    """True when ``cgc._C`` has kernels for ``device`` (CPU always; CUDA when built with its
    CUDA part and a GPU is visible)."""
    if _IMPORT_ERROR is not None:
        return False
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(kind)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("cgc::gradcam_fwd", key)


# ----------------------------------------------------------------------------- backend API
def gradcam(activations: torch.Tensor, gradients: torch.Tensor, pool: bool) -> torch.Tensor:
    return torch.ops.cgc.gradcam_fwd(activations, gradients, pool)


def affine_warp(input: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], padding_mode: str) -> torch.Tensor:
    return torch.ops.cgc.affine_warp_fwd(input, theta, size[0], size[1], PADDING[padding_mode])


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    return torch.ops.cgc.info_nce_fwd(anchors, positives, temperature, REDUCTION[reduction])[0]


# ----------------------------------------------------------------------------- registrations
def _pooled(x: torch.Tensor, gradients_dim: int, pool: bool) -> torch.Tensor:
    """The channel weights ``P(x)`` of ``gradcam`` broadcast to [B,K,H,W] (x shaped like the
    gradients): spatial mean, identity (element-wise) or the [B,K] weights themselves."""
    if gradients_dim == 2:
        return x[:, :, None, None]
    return x.mean(dim=(2, 3), keepdim=True) if pool else x


def _register() -> None:
    lib = "cgc::"

    # gradcam ------------------------------------------------------------------
    @torch.library.register_fake(lib + "gradcam_fwd")
    def _(activations, gradients, pool):
        B, _, H, W = activations.shape
        return activations.new_empty((B, H, W))

    @torch.library.register_fake(lib + "gradcam_bwd")
    def _(grad_out, out, activations, gradients, pool):
        return torch.empty_like(activations), torch.empty_like(gradients)

    def gradcam_setup(ctx, inputs, output):
        activations, gradients, pool = inputs
        ctx.save_for_backward(activations, gradients, output)
        ctx.pool = pool

    def gradcam_backward(ctx, grad):
        activations, gradients, out = ctx.saved_tensors
        d_act, d_grad = torch.ops.cgc.gradcam_bwd(grad, out, activations, gradients, ctx.pool)
        return d_act, d_grad, None

    torch.library.register_autograd(lib + "gradcam_fwd", gradcam_backward, setup_context=gradcam_setup)

    # gradcam_bwd(go, out, A, G) = (m go P(G), P^T(m go A)) with m = (out > 0) is bilinear in
    # (go, A) and (go, G): its vector-Jacobian product with (gA, gG) is gradcam_bwd(go, out, gA, gG)
    # for (A, G), and m * (sum_k gA P(G) + sum_k A P(gG)) for go. `out` only carries the mask.
    def gradcam_bwd_setup(ctx, inputs, output):
        grad_out, out, activations, gradients, pool = inputs
        ctx.save_for_backward(grad_out, out, activations, gradients)
        ctx.pool = pool

    def gradcam_bwd_backward(ctx, g_act, g_grad):
        grad_out, out, activations, gradients = ctx.saved_tensors
        d_act, d_grad = torch.ops.cgc.gradcam_bwd(grad_out, out, g_act, g_grad, ctx.pool)
        k = gradients.dim()
        lin = (g_act * _pooled(gradients, k, ctx.pool)).sum(1) + (activations * _pooled(g_grad, k, ctx.pool)).sum(1)
        d_out = torch.where(out > 0, lin, torch.zeros_like(lin))
        return d_out, None, d_act, d_grad, None

    torch.library.register_autograd(lib + "gradcam_bwd", gradcam_bwd_backward, setup_context=gradcam_bwd_setup)

    # affine_warp ----------------------------------------------------------------
    @torch.library.register_fake(lib + "affine_warp_fwd")
    def _(input, theta, out_h, out_w, padding_mode):
        return input.new_empty((input.shape[0], input.shape[1], out_h, out_w))

    @torch.library.register_fake(lib + "affine_warp_bwd")
    def _(grad_out, theta, in_h, in_w, padding_mode):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], in_h, in_w))

    def warp_setup(ctx, inputs, output):
        input, theta, out_h, out_w, padding_mode = inputs
        ctx.save_for_backward(theta)
        ctx.args = (input.shape[2], input.shape[3], padding_mode)

    def warp_backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return torch.ops.cgc.affine_warp_bwd(grad, theta, *ctx.args), None, None, None, None

    torch.library.register_autograd(lib + "affine_warp_fwd", warp_backward, setup_context=warp_setup)

    def warp_bwd_setup(ctx, inputs, output):
        grad_out, theta, in_h, in_w, padding_mode = inputs
        ctx.save_for_backward(theta)
        ctx.args = (grad_out.shape[2], grad_out.shape[3], padding_mode)

    def warp_bwd_backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return torch.ops.cgc.affine_warp_fwd(grad, theta, *ctx.args), None, None, None, None

    torch.library.register_autograd(lib + "affine_warp_bwd", warp_bwd_backward, setup_context=warp_bwd_setup)

    # info_nce -------------------------------------------------------------------
    @torch.library.register_fake(lib + "info_nce_fwd")
    def _(anchors, positives, temperature, reduction):
        B = anchors.shape[0]
        loss = anchors.new_empty((B,) if reduction == REDUCTION["none"] else ())
        f64 = torch.float64  # logits and stats are always kept in double (csrc/cgc.h)
        return loss, anchors.new_empty((B, B), dtype=f64), anchors.new_empty((3, B), dtype=f64)

    @torch.library.register_fake(lib + "info_nce_bwd")
    def _(grad_loss, anchors, positives, logits, stats, temperature, reduction):
        return torch.empty_like(anchors), torch.empty_like(positives)

    def nce_setup(ctx, inputs, output):
        anchors, positives, temperature, reduction = inputs
        _, logits, stats = output
        ctx.save_for_backward(anchors, positives, logits, stats)
        ctx.args = (temperature, reduction)
        ctx.mark_non_differentiable(logits, stats)

    def nce_backward(ctx, grad_loss, _grad_logits, _grad_stats):
        anchors, positives, logits, stats = ctx.saved_tensors
        da, dp = torch.ops.cgc.info_nce_bwd(grad_loss, anchors, positives, logits, stats, *ctx.args)
        return da, dp, None, None

    torch.library.register_autograd(lib + "info_nce_fwd", nce_backward, setup_context=nce_setup)

    def nce_bwd_setup(ctx, inputs, output):
        pass

    def nce_bwd_backward(ctx, *grads):
        raise RuntimeError("the native info_nce is differentiable once; for higher-order gradients "
                           "use backend='reference'")

    torch.library.register_autograd(lib + "info_nce_bwd", nce_bwd_backward, setup_context=nce_bwd_setup)


if _IMPORT_ERROR is None:
    _register()
