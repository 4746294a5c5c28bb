"""Differentiable, batched Grad-CAM for any CNN: the explanation as a tensor in the graph.

``GradCAM(model)`` hooks one layer (given by dotted name, or found: the last module with a
convolution inside whose output is still a spatial map). ``cam(x)`` runs the model, takes the
gradient of the chosen class scores w.r.t. that layer's activations and combines the two with
:func:`cgc.ops.gradcam`. With ``create_graph=True`` the heatmap is differentiable, so a loss
on it trains the network (second order through the layers after the hooked one).

It never changes ``model.train()/eval()`` state or any value, keeps no tensors between calls,
and removes its hook on :meth:`GradCAM.close` or at the end of a ``with`` block. On CPU it
stores the model's 4-D weights in channels-last memory format (same values, same ``Parameter``
objects), oneDNN's native convolution layout: the forward, which is nearly all of Grad-CAM's
cost, runs about 1.5x faster than on NCHW weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import ops


def find_target_layer(model: nn.Module, input_size: int = 224) -> str:
    """Dotted name of the last convolutional stage of ``model``.

    Runs one forward pass on the ``meta`` device (a copy of the model without data, so the
    real model, its buffers and its mode are untouched) and returns the last module to finish
    that contains a convolution and outputs a 4-D map with more than one pixel: ``layer4`` for
    ResNets, ``features`` for VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    has_conv = {name for name, m in meta.named_modules()
                if any(isinstance(s, nn.modules.conv._ConvNd) for s in m.modules())}
    order: list[str] = []
    handles = []

    def record(name):
        def hook(_module, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
                order.append(name)
        return hook

    for name, module in meta.named_modules():
        if name and name in has_conv:
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            meta(torch.empty(1, 3, input_size, input_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("could not find a convolutional layer with a spatial output in "
                         f"{type(model).__name__}; pass target_layer='dotted.module.name'")
    return order[-1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted), with an error listing close names if absent."""
    modules = dict(model.named_modules())
    if name not in modules:
        near = [n for n in modules if n and (n.startswith(name.split(".")[0]))][:10]
        raise ValueError(f"model {type(model).__name__} has no module {name!r}"
                         + (f"; modules with that prefix: {near}" if near else ""))
    return modules[name]


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` in channels-last memory format, in
    place: the same ``Parameter`` objects (optimizers keep working) with the same values."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


@dataclass
class CAMOutput:
    """Heatmaps ``cams`` [B,h,w] at the target layer's resolution, with the model's
    ``logits`` [B,classes] and the ``targets`` [B] the heatmaps explain."""

    cams: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class GradCAM:
    """Batched Grad-CAM of ``model`` at ``target_layer`` (see module docstring).

    ``pool=True`` is classic Grad-CAM (channel weights = spatial mean of the gradients);
    ``pool=False`` multiplies gradients and activations element-wise, as the CGC recipe does.
    ``channels_last`` (default: when the model is on the CPU) puts the model's 4-D weights and
    every input batch in channels-last memory format; values and results are unchanged.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, *, pool: bool = True,
                 backend: str | None = None, channels_last: bool | None = None):
        self._handle = None
        self.model = model
        self.target_layer = target_layer or find_target_layer(model)
        self.pool = pool
        self.backend = backend
        if channels_last is None:
            first = next(model.parameters(), None)
            channels_last = first is not None and first.device.type == "cpu"
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(model)
        self._activations: torch.Tensor | None = None
        self._handle = get_module(model, self.target_layer).register_forward_hook(self._keep)

    def _keep(self, _module, _inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(f"target layer {self.target_layer!r} must output a [B,K,H,W] "
                             f"tensor, got {type(out).__name__} {getattr(out, 'shape', '')}")
        self._activations = out

    # -- the two halves, usable separately by a training step that needs the logits first
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return ``(logits, activations)`` with the activations in the graph."""
        if self._handle is None:
            raise RuntimeError("this GradCAM is closed; create a new one")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"GradCAM expects a non-empty image batch [B,C,H,W], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        self._activations = None
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.enable_grad():
            logits = self.model(x)
        acts, self._activations = self._activations, None
        if acts is None:
            raise RuntimeError(f"target layer {self.target_layer!r} did not run in the forward pass")
        if not acts.requires_grad:
            raise RuntimeError("the target layer's activations do not require grad: the layers "
                               "before it are frozen and the input needs no grad; call "
                               "x.requires_grad_() or unfreeze a layer")
        if logits.dim() != 2:
            raise ValueError(f"model must return logits [B,classes], got shape {tuple(logits.shape)}")
        return logits, acts

    def heatmaps(self, logits: torch.Tensor, activations: torch.Tensor, targets: torch.Tensor,
                 *, rows: slice | None = None, create_graph: bool = False) -> torch.Tensor:
        """Grad-CAM [b,h,w] for the batch ``rows`` (default all) explaining class ``targets`` [b].

        The score is the sum of the selected logits, so one backward pass gives every row's
        gradient (rows do not interact unless a layer after the target mixes the batch).
        """
        sel = logits if rows is None else logits[rows]
        if targets.shape != sel.shape[:1]:
            raise ValueError(f"targets must be [{sel.shape[0]}], got {tuple(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= sel.shape[1]):
            raise ValueError(f"targets must be class ids in [0, {sel.shape[1]}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        score = sel.gather(1, targets.to(sel.device).long()[:, None]).sum()
        (grads,) = torch.autograd.grad(score, activations, create_graph=create_graph,
                                       retain_graph=True if create_graph else None)
        acts = activations if rows is None else activations[rows]
        grads = grads if rows is None else grads[rows]
        if not create_graph:
            acts, grads = acts.detach(), grads.detach()
        return ops.gradcam(acts, grads, pool=self.pool, backend=self.backend)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None, *,
                 create_graph: bool = False) -> CAMOutput:
        """Heatmaps of ``x`` for ``targets`` [B] (default: the predicted classes)."""
        logits, acts = self.forward(x)
        if targets is None:
            targets = logits.detach().argmax(1)
        elif not isinstance(targets, torch.Tensor):
            targets = torch.as_tensor(targets, device=logits.device)
        if targets.dim() == 0:
            targets = targets.expand(x.shape[0])
        cams = self.heatmaps(logits, acts, targets, create_graph=create_graph)
        if not create_graph:
            logits = logits.detach()
        return CAMOutput(cams, logits, targets)

    def close(self) -> None:
        """Remove the hook; the model is left as it was found."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activations = None

    def __enter__(self) -> "GradCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def resize_heatmaps(cams: torch.Tensor, size, *, backend: str | None = None) -> torch.Tensor:
    """Bilinear resize of heatmaps [B,h,w] to ``size`` (int or (H, W)) -> [B,H,W]:
    an identity :func:`cgc.ops.affine_warp` with border padding, i.e. ``F.interpolate``."""
    from .transforms import identity_theta

    theta = identity_theta(cams.shape[0], cams.device, torch.float32)
    return ops.affine_warp(cams[:, None], theta, size, padding_mode="border", backend=backend)[:, 0]
