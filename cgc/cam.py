"""Differentiable, batched CAMs for CNNs and vision transformers: the explanation as a tensor
in the graph.

``CAM(model, method=...)`` (also ``GradCAM``, its familiar name: the default method is
Grad-CAM) hooks one layer (given by dotted name, or found by
:func:`cgc.find_target_layer`: a CNN's last convolutional stage, a transformer's last
block). ``cam(x)`` runs the model, takes the gradient of the chosen class scores w.r.t. that
layer's activations, read as a map ``[B,C,h,w]`` (a transformer's tokens or channels-last maps
through :mod:`cgc.structure`), and turns the two into a heatmap with a registered CAM method
(:mod:`cgc.cam_methods`: Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM) and the fused op
:func:`cgc.ops.gradcam`. With ``create_graph=True`` the heatmap is differentiable, so a loss on
it trains the network (second order through the layers after the hooked one). Those layers run
with PyTorch's math attention kernel (:func:`torch.nn.attention.sdpa_kernel`, entered by the
hook and left when the model's forward pass ends): the fused kernels (flash, memory-efficient,
the CPU flash kernel) have no double backward. The layers before keep the fused kernels.

It never changes ``model.train()/eval()`` state or any value, keeps no tensors between calls
(its hook records only while :meth:`CAM.forward` runs) and removes its hook on
:meth:`CAM.close` or at the end of a ``with`` block. ``channels_last=True`` stores the
model's 4-D weights in channels-last memory format, in place (same values, same ``Parameter``
objects), and feeds every batch in that format: oneDNN's native convolution layout, about
1.5x faster forwards on CPUs. It is off unless asked for; the command lines ask for it on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import models, ops, structure, transforms
from .cam_methods import get_cam_method
from .errors import ConfigError, UnsupportedModel


@dataclass
class CAMOutput:
    """Heatmaps ``cams`` [B,h,w] at the target layer's resolution, with the model's
    ``logits`` [B,classes] and the ``targets`` [B] the heatmaps explain."""

    cams: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class CAM:
    """Batched CAM of ``model`` at ``target_layer`` with a registered ``method`` (see the
    module docstring; ``cgc.CAM_METHODS`` lists them): ``gradcam`` (classic, pooled
    gradients), ``hirescam`` (gradient x activation element-wise, the CGC authors' choice),
    ``gradcam++``, ``xgradcam``, ``layercam``.

    A transformer layer's tokens or channels-last map is read as ``[B,C,h,w]`` with the layout
    :func:`cgc.structure.layer_layout` infers from the model, or with ``reshape``: a
    :class:`cgc.structure.TokenMap`, or a function ``layer output -> [B,C,h,w]`` that only
    moves values (as pytorch-grad-cam's ``reshape_transform``); ``layout`` is the reader used.
    The layers after the hooked one read the layer's output rebuilt from that map (same
    values), so the map is in the graph. A layer whose output is a tuple or list (Hugging Face's
    blocks: hidden states first, then attention weights) is read by its first element, and the
    layers after it get the tuple with that element rebuilt.

    The first call checks that the class scores depend on the map: when no gradient of the
    summed logits reaches the layer's output (the layers after it do not read it), or when the
    map leaves tokens out (a class token) and the gradient reaches those tokens but is zero on
    every map position (the final norm of a class-token ViT), it raises
    :class:`cgc.errors.UnsupportedModel`; later calls skip the check.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None = None,
        *,
        method: str = "gradcam",
        backend: str | None = None,
        channels_last: bool = False,
        reshape=None,
    ):
        self._handle = None
        self._weights = get_cam_method(method)
        self.model = model
        self.method = method
        inner, prefix = structure.unwrap(model)
        self._info = models.describe(inner)  # once: the layer search and the layout read it
        self.target_layer = target_layer or structure.target_layer_of(model, self._info)
        self.backend = backend
        self.channels_last = channels_last
        self.reshape = reshape
        module = structure.get_module(model, self.target_layer)
        self.layout = structure.map_reader(reshape) or structure.layer_layout(
            inner, self.target_layer.removeprefix(prefix), self._info
        )
        if channels_last:
            structure.to_channels_last(model)
        self._capturing = False
        self._checked = False
        self._image_hw: tuple[int, int] = (0, 0)
        self._math_attention = None
        self._activations: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._on_layer_output)

    def with_model(self, model: nn.Module) -> CAM:
        """A new CAM with these settings on another model of the same architecture."""
        return CAM(
            model,
            self.target_layer,
            method=self.method,
            backend=self.backend,
            channels_last=self.channels_last,
            reshape=self.reshape,
        )

    def _on_layer_output(self, _module, _inp, out):
        """Forward hook: keep the layer's output as a map and hand the layers after it the
        output rebuilt from that map; run those layers with the math attention kernel."""
        if not self._capturing:
            return None
        if self._math_attention is None:
            # the fused attention kernels have no double backward, which the CGC term needs
            self._math_attention = sdpa_kernel(SDPBackend.MATH)
            self._math_attention.__enter__()
        first = structure.first_tensor(out)
        if first is None:
            raise UnsupportedModel(
                f"target layer {self.target_layer!r} outputs a {type(out).__name__}, not a tensor or a tuple "
                "that starts with one; pass target_layer= of another layer"
            )
        try:
            maps = self.layout.to_map(first, self._image_hw)
        except UnsupportedModel as err:
            raise UnsupportedModel(
                f"target layer {self.target_layer!r} cannot be read as a [B,C,h,w] map: {err}; pass "
                "target_layer= of another layer, or reshape= (layer output -> [B,C,h,w])"
            ) from None
        self._activations, self._output = maps, first
        rebuilt = self.layout.from_map(maps, first)
        if rebuilt is None or first is out:
            return rebuilt
        rest = list(out[1:])  # the tuple's other elements, as they were
        return type(out)(rebuilt, *rest) if hasattr(out, "_fields") else type(out)([rebuilt, *rest])

    # -- the two halves, usable separately by a training step that needs the logits first
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return ``(logits, activations)`` with the activations [B,C,h,w] in
        the graph."""
        if self._handle is None:
            raise RuntimeError("this CAM is closed; create a new one")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(
                f"a CAM expects a non-empty image batch [B,C,H,W], got {getattr(x, 'shape', type(x).__name__)}"
            )
        self._image_hw = (x.shape[-2], x.shape[-1])
        why = self._info.refuses(self._image_hw) if self._info is not None else None
        if why:
            raise ConfigError(
                f"{type(structure.unwrap(self.model)[0]).__name__} cannot take {x.shape[-2]}x{x.shape[-1]} px images: {why}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._capturing = True
        try:
            with torch.enable_grad():
                logits = structure.logits_of(self.model(x))
        finally:
            self._capturing = False
            if self._math_attention is not None:
                self._math_attention.__exit__(None, None, None)
                self._math_attention = None
            acts, out = self._activations, self._output
            self._activations = self._output = None
        if acts is None:
            raise RuntimeError(f"target layer {self.target_layer!r} did not run in the forward pass")
        if not acts.requires_grad:
            raise RuntimeError(
                "the target layer's activations do not require grad: the layers "
                "before it are frozen and the input needs no grad; call "
                "x.requires_grad_() or unfreeze a layer"
            )
        if logits.dim() != 2:
            raise ValueError(f"model must return logits [B,classes], got shape {tuple(logits.shape)}")
        if not self._checked:
            self._check_scores_reach(logits, acts, out)
        self._checked = True
        return logits, acts

    def _check_scores_reach(self, logits: torch.Tensor, acts: torch.Tensor, out: torch.Tensor) -> None:
        """Refuse a layer whose output the class scores do not depend on (no gradient reaches
        it: the layers after it do not read it), and a map that they do not depend on while the
        tokens it leaves out (the class token) carry their whole gradient."""
        g_map, g_out = torch.autograd.grad(logits.sum(), (acts, out), retain_graph=True, allow_unused=True)
        if g_map is None and g_out is None:
            raise UnsupportedModel(
                f"the class scores do not depend on target layer {self.target_layer!r}: no gradient reaches its "
                "output (the layers after it do not read it); pass target_layer= of a layer on the way to the head"
            )
        if acts.numel() != out.numel() and (g_map is None or not g_map.any()) and g_out is not None and g_out.any():
            raise UnsupportedModel(
                f"the class scores do not depend on the patch tokens of target layer {self.target_layer!r} "
                "(only the prefix tokens reach the head from there): pass target_layer= of an earlier layer, "
                "e.g. the last block's first norm (find_target_layer's choice), or reshape="
            )

    def heatmaps(
        self,
        logits: torch.Tensor,
        activations: torch.Tensor,
        targets: torch.Tensor,
        *,
        rows: slice | None = None,
        create_graph: bool = False,
    ) -> torch.Tensor:
        """Heatmaps [b,h,w] for the batch ``rows`` (default all) explaining class ``targets`` [b].

        The score is the sum of the selected logits, so one backward pass gives every row's
        gradient (rows do not interact unless a layer after the target mixes the batch).
        """
        sel = logits if rows is None else logits[rows]
        if targets.shape != sel.shape[:1]:
            raise ValueError(f"targets must be [{sel.shape[0]}], got {tuple(targets.shape)}")
        if targets.numel() and (targets.min() < 0 or targets.max() >= sel.shape[1]):
            raise ValueError(
                f"targets must be class ids in [0, {sel.shape[1]}), got [{int(targets.min())}, {int(targets.max())}]"
            )
        score = sel.gather(1, targets.to(sel.device).long()[:, None]).sum()
        (grads,) = torch.autograd.grad(
            score, activations, create_graph=create_graph, retain_graph=True if create_graph else None
        )
        acts = activations if rows is None else activations[rows]
        grads = grads if rows is None else grads[rows]
        if not create_graph:
            acts, grads = acts.detach(), grads.detach()
        weights, pool = self._weights(acts, grads)
        return ops.gradcam(acts, weights, pool=pool, backend=self.backend)

    def __call__(
        self, x: torch.Tensor, targets: torch.Tensor | None = None, *, create_graph: bool = False
    ) -> CAMOutput:
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

    def __enter__(self) -> CAM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


#: the familiar name: ``GradCAM(model)`` is a :class:`CAM` with its default method, Grad-CAM
GradCAM = CAM


def resize_heatmaps(cams: torch.Tensor, size, *, backend: str | None = None) -> torch.Tensor:
    """Bilinear resize of heatmaps [B,h,w] to ``size`` (int or (H, W)) -> [B,H,W]:
    an identity :func:`cgc.ops.affine_warp` with border padding, i.e. ``F.interpolate``."""
    theta = transforms.identity_theta(cams.shape[0], cams.device, torch.float32)
    return ops.affine_warp(cams[:, None], theta, size, padding_mode="border", backend=backend)[:, 0]
