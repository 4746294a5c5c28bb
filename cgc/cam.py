"""Differentiable, batched CAMs for any CNN: the explanation as a tensor in the graph.

``GradCAM(model, method=...)`` hooks one layer (given by dotted name, or found: the last module
with a convolution inside whose output is still a spatial map). ``cam(x)`` runs the model,
takes the gradient of the chosen class scores w.r.t. that layer's activations and turns the
two into a heatmap with a registered CAM method (:mod:`cgc.cam_methods`: Grad-CAM, HiResCAM,
Grad-CAM++, XGrad-CAM, LayerCAM) and the fused op :func:`cgc.ops.gradcam`. With
``create_graph=True`` the heatmap is differentiable, so a loss on it trains the network
(second order through the layers after the hooked one).

It never changes ``model.train()/eval()`` state or any value, keeps no tensors between calls
(its hook records only while :meth:`GradCAM.forward` runs) and removes its hook on
:meth:`GradCAM.close` or at the end of a ``with`` block. ``channels_last=True`` stores the
model's 4-D weights in channels-last memory format, in place (same values, same ``Parameter``
objects), and feeds every batch in that format: oneDNN's native convolution layout, about
1.5x faster forwards on CPUs. It is off unless asked for; the command lines ask for it on CPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .cam_methods import get_cam_method
from .errors import UnknownName, UnsupportedModel

#: modules that may end a convolutional stage after its last convolution (timm's
#: BatchNormAct2d, torchvision's final norm + ReLU): the heatmap layer may be one of them
_STAGE_END = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
)


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """``(inner module, name prefix)`` of a DistributedDataParallel / DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module."
    return model, ""


def find_target_layer(model: nn.Module, input_size: int = 224) -> str:
    """Dotted name of the last convolutional stage of ``model``.

    Runs one forward pass on the ``meta`` device through :func:`torch.func.functional_call`
    with meta stand-ins for every parameter and buffer: nothing is copied or computed, and the
    real model, its values and its mode are untouched. Returns the last module to finish that
    contains a convolution (or is a normalization or activation after one) and outputs a 4-D
    map with more than one pixel: ``layer4`` for ResNets, ``features`` for torchvision's
    VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt, ``bn2`` (norm + activation after
    ``conv_head``) for timm's EfficientNet.
    """
    inner, prefix = _unwrap(model)
    has_conv = {
        name for name, m in inner.named_modules() if any(isinstance(s, nn.modules.conv._ConvNd) for s in m.modules())
    }
    ends = {name for name, m in inner.named_modules() if isinstance(m, _STAGE_END)}
    order: list[str] = []
    handles = []

    def record(name):
        def hook(_module, _inp, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
                order.append(name)

        return hook

    stand_ins = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*inner.named_parameters(remove_duplicate=False), *inner.named_buffers(remove_duplicate=False)]
    }
    for name, module in inner.named_modules():
        if name and (name in has_conv or name in ends):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            # two images: a training-mode BatchNorm on a 1x1 map refuses a batch of one
            torch.func.functional_call(inner, stand_ins, (torch.empty(2, 3, input_size, input_size, device="meta"),))
    except (RuntimeError, ValueError, TypeError) as err:
        raise UnsupportedModel(
            f"could not find the CAM layer of {type(inner).__name__}: a forward pass of "
            f"{input_size} px images failed ({str(err).splitlines()[0]}); pass "
            "target_layer='dotted.module.name'"
        ) from err
    finally:
        for h in handles:
            h.remove()
    if not any(name in has_conv for name in order):
        raise UnsupportedModel(
            "could not find a convolutional layer with a spatial output in "
            f"{type(inner).__name__} (CAMs need a [B,K,H,W] feature map); "
            "pass target_layer='dotted.module.name' of such a layer"
        )
    return prefix + order[-1]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted); :class:`cgc.errors.UnknownName` suggesting the
    closest module names if absent."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise UnknownName(
            "target layer", name, [n for n in modules if n], hint=f"a dotted module name of {type(model).__name__}"
        )
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
    """Batched CAM of ``model`` at ``target_layer`` with a registered ``method`` (see the
    module docstring; ``cgc.CAM_METHODS`` lists them): ``gradcam`` (classic, pooled
    gradients), ``hirescam`` (gradient x activation element-wise, the CGC authors' choice),
    ``gradcam++``, ``xgradcam``, ``layercam``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None = None,
        *,
        method: str = "gradcam",
        backend: str | None = None,
        channels_last: bool = False,
    ):
        self._handle = None
        self._weights = get_cam_method(method)
        self.model = model
        self.method = method
        self.target_layer = target_layer or find_target_layer(model)
        self.backend = backend
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(model)
        self._capturing = False
        self._activations: torch.Tensor | None = None
        self._handle = get_module(model, self.target_layer).register_forward_hook(self._keep)

    def with_model(self, model: nn.Module) -> GradCAM:
        """A new GradCAM with these settings on another model of the same architecture."""
        return GradCAM(
            model, self.target_layer, method=self.method, backend=self.backend, channels_last=self.channels_last
        )

    def _keep(self, _module, _inp, out):
        if not self._capturing:
            return
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(
                f"target layer {self.target_layer!r} must output a [B,K,H,W] "
                f"tensor, got {type(out).__name__} {getattr(out, 'shape', '')}"
            )
        self._activations = out

    # -- the two halves, usable separately by a training step that needs the logits first
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return ``(logits, activations)`` with the activations in the graph."""
        if self._handle is None:
            raise RuntimeError("this GradCAM is closed; create a new one")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(
                f"GradCAM expects a non-empty image batch [B,C,H,W], got {getattr(x, 'shape', type(x).__name__)}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._capturing = True
        try:
            with torch.enable_grad():
                logits = self.model(x)
        finally:
            self._capturing = False
            acts, self._activations = self._activations, None
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
        return logits, acts

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

    def __enter__(self) -> GradCAM:
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
