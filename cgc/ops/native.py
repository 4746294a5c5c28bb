"""The ``native`` backend: the compiled kernels of ``cgc._C`` (``csrc/``) as ``torch.ops.cgc``.

Each op is a forward/backward pair of custom operators with a kernel per device and an
autograd kernel, all in C++ (``csrc/autograd.cpp``: C++ autograd costs a fraction of the host
time of :func:`torch.library.register_autograd`, which dominated at small sizes and on GPUs);
this module registers their fake implementations (:func:`torch.library.register_fake`, output
shapes for ``torch.compile``) and exposes the backend interface of :mod:`cgc.ops`.

Differentiability: ``gradcam`` to any order (its backward op has its own autograd, needed
because the CGC loss differentiates a heatmap built from ``create_graph`` gradients);
``affine_warp`` to any order (forward and backward are each other's transpose); ``info_nce``,
also with explicit negatives, to first order (its backward raises if differentiated again: use
the reference for that).
"""

from __future__ import annotations

import torch

try:
    from cgc import _C  # noqa: F401  (loading the library registers torch.ops.cgc)
except ImportError as err:  # not built: ``pip install --no-build-isolation -e .``
    _IMPORT_ERROR: str | None = (
        f"the extension cgc._C is not built or cannot be loaded ({err}); "
        "build it with `pip install --no-build-isolation -e .`"
    )
else:
    _IMPORT_ERROR = None

PADDING = {"zeros": 0, "border": 1}
REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def unavailable_reason() -> str | None:
    """Why this backend cannot run in this process, or None when it can."""
    return _IMPORT_ERROR


_HAS_KERNELS: dict[str, bool] = {}  # device type -> registered kernels (fixed once loaded)


def supports(device: torch.device) -> bool:
    """True when ``cgc._C`` has kernels for ``device`` (CPU always; CUDA when built with its
    CUDA part and a GPU is visible). Called on every op: the dispatcher query is cached."""
    if _IMPORT_ERROR is not None:
        return False
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return False
    if kind not in _HAS_KERNELS:
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(kind)
        _HAS_KERNELS[kind] = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("cgc::gradcam_fwd", key)
    return _HAS_KERNELS[kind]


# ----------------------------------------------------------------------------- backend API
def gradcam(activations: torch.Tensor, gradients: torch.Tensor, pool: bool) -> torch.Tensor:
    return torch.ops.cgc.gradcam_fwd(activations, gradients, pool)


def affine_warp(input: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], padding_mode: str) -> torch.Tensor:
    return torch.ops.cgc.affine_warp_fwd(input, theta, size[0], size[1], PADDING[padding_mode])


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float, reduction: str) -> torch.Tensor:
    return torch.ops.cgc.info_nce_fwd(anchors, positives, temperature, REDUCTION[reduction])[0]


def info_nce_neg(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    anchor_index: torch.Tensor,
    temperature: float,
    reduction: str,
) -> torch.Tensor:
    return torch.ops.cgc.info_nce_neg_fwd(
        anchors, positives, negatives, anchor_index, temperature, REDUCTION[reduction]
    )[0]


# ----------------------------------------------------------------------------- registrations
def _register() -> None:
    """Fake (meta) implementations: output shapes and dtypes for ``torch.compile`` tracing."""
    lib = "cgc::"

    @torch.library.register_fake(lib + "gradcam_fwd")
    def _(activations, gradients, pool):
        B, _, H, W = activations.shape
        return activations.new_empty((B, H, W))

    @torch.library.register_fake(lib + "gradcam_bwd")
    def _(grad_out, out, activations, gradients, pool):
        return torch.empty_like(activations), torch.empty_like(gradients)

    @torch.library.register_fake(lib + "affine_warp_fwd")
    def _(input, theta, out_h, out_w, padding_mode):
        return input.new_empty((input.shape[0], input.shape[1], out_h, out_w))

    @torch.library.register_fake(lib + "affine_warp_bwd")
    def _(grad_out, theta, in_h, in_w, padding_mode):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], in_h, in_w))

    @torch.library.register_fake(lib + "info_nce_fwd")
    def _(anchors, positives, temperature, reduction):
        B = anchors.shape[0]
        loss = anchors.new_empty((B,) if reduction == REDUCTION["none"] else ())
        f64 = torch.float64  # logits and stats are always kept in double (csrc/cgc.h)
        return loss, anchors.new_empty((B, B), dtype=f64), anchors.new_empty((3, B), dtype=f64)

    @torch.library.register_fake(lib + "info_nce_bwd")
    def _(grad_loss, anchors, positives, logits, stats, temperature, reduction):
        return torch.empty_like(anchors), torch.empty_like(positives)

    @torch.library.register_fake(lib + "info_nce_neg_fwd")
    def _(anchors, positives, negatives, anchor_index, temperature, reduction):
        b, n = anchors.shape[0], negatives.shape[0]
        loss = anchors.new_empty((b,) if reduction == REDUCTION["none"] else ())
        f64 = torch.float64
        return (
            loss,
            anchors.new_empty((b, n + 1), dtype=f64),
            anchors.new_empty((3, b), dtype=f64),
            anchors.new_empty((n,), dtype=f64),
        )

    @torch.library.register_fake(lib + "info_nce_neg_bwd")
    def _(grad_loss, anchors, positives, negatives, logits, stats, neg_norms, temperature, reduction):
        return torch.empty_like(anchors), torch.empty_like(positives), torch.empty_like(negatives)


if _IMPORT_ERROR is None:
    _register()
