"""Differentiable, batched CAMs for CNNs and vision transformers: the explanation as a tensor
in the graph.

``GradCAM(model, method=...)`` hooks one layer (given by dotted name, or found by
:func:`find_target_layer`: a CNN's last convolutional stage, a transformer's last block).
``cam(x)`` runs the model, takes the gradient of the chosen class scores w.r.t. that layer's
activations, read as a map ``[B,C,h,w]`` (a transformer's tokens or channels-last maps through
:mod:`cgc.token_maps`), and turns the two into a heatmap with a registered CAM method
(:mod:`cgc.cam_methods`: Grad-CAM, HiResCAM, Grad-CAM++, XGrad-CAM, LayerCAM) and the fused op
:func:`cgc.ops.gradcam`. With ``create_graph=True`` the heatmap is differentiable, so a loss on
it trains the network (second order through the layers after the hooked one). Those layers run
with PyTorch's math attention kernel (:func:`torch.nn.attention.sdpa_kernel`, entered by the
hook and left when the model's forward pass ends): the fused kernels (flash, memory-efficient,
the CPU flash kernel) have no double backward. The layers before keep the fused kernels.

It never changes ``model.train()/eval()`` state or any value, keeps no tensors between calls
(its hook records only while :meth:`GradCAM.forward` runs) and removes its hook on
:meth:`GradCAM.close` or at the end of a ``with`` block. ``channels_last=True`` stores the
model's 4-D weights in channels-last memory format, in place (same values, same ``Parameter``
objects), and feeds every batch in that format: oneDNN's native convolution layout, about
1.5x faster forwards on CPUs. It is off unless asked for; the command lines ask for it on CPUs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ops, token_maps
from .cam_methods import get_cam_method
from .errors import ConfigError, UnknownName, UnsupportedModel

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


def find_target_layer(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> str:
    """Dotted name of the layer whose map explains ``model``'s class scores best.

    The rule: for the vision transformers :func:`cgc.token_maps.describe` recognizes, the end
    of the blocks, on the side the head reads. A class-token head (timm ``global_pool ==
    'token'``: ViT, DeiT and distilled DeiT, register-token ViTs; torchvision's ViT) sees only
    the prefix tokens after the last block, so the final norm's patch tokens get no gradient:
    the layer is the last block's first norm, at the input side of the attention that mixes
    the patch tokens into the class token (``blocks.11.norm1``,
    ``encoder.layers.encoder_layer_11.ln_1``). A head that pools the patch tokens (Swin, timm
    ViT/EVA/BEiT with ``global_pool='avg'``) reads the final norm (``norm``; the last block
    when that norm is an ``nn.Identity``). For any other model: the last module to finish that
    contains a convolution (or is a normalization or activation after one) and outputs a 4-D
    map with more than one pixel: ``layer4`` for ResNets, ``features`` for torchvision's
    VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt, ``bn2`` (norm + activation after
    ``conv_head``) for timm's EfficientNet, ``stages`` for timm's ConvNeXt.

    Never a stem: a layer after which parameterized layers still work on token sequences or
    spatial maps (a patch embedding or first convolution followed by unrecognized transformer
    blocks) is refused, as is a layer whose output is not a map of more than one position at
    this input size, with :class:`cgc.errors.UnsupportedModel` (pass ``target_layer=`` and,
    for tokens, ``reshape=``).

    Runs one forward pass of ``input_size`` images (default: the size a transformer was built
    for, else 224) on the ``meta`` device through :func:`torch.func.functional_call` with meta
    stand-ins for every parameter and buffer: nothing is copied or computed, and the real
    model, its values and its mode are untouched.
    """
    inner, prefix = _unwrap(model)
    info = token_maps.describe(inner)
    size = input_size or (info.image_size if info is not None else None) or 224
    hw = (size, size) if isinstance(size, int) else tuple(size)
    runs = _trace(inner, hw)
    if info is not None:
        return prefix + _transformer_layer(inner, info, runs, hw)
    has_conv = {
        name for name, m in inner.named_modules() if any(isinstance(s, nn.modules.conv._ConvNd) for s in m.modules())
    }
    ends = {name for name, m in inner.named_modules() if isinstance(m, _STAGE_END)}
    spatial = [
        r
        for r in runs
        if (r.name in has_conv or r.name in ends) and len(r.shape) == 4 and r.shape[-1] * r.shape[-2] > 1
    ]
    if not any(r.name in has_conv for r in spatial):
        raise UnsupportedModel(
            "could not find a convolutional layer with a spatial output in "
            f"{type(inner).__name__} (CAMs need a [B,K,H,W] feature map); "
            "pass target_layer='dotted.module.name' of such a layer"
        )
    found = spatial[-1]
    modules = dict(inner.named_modules())
    later = [
        r
        for r in runs
        if r.start > found.end
        and _positions(r.shape) > 1
        and any(True for _ in modules[r.name].parameters(recurse=False))
    ]
    if later:
        raise UnsupportedModel(
            f"{type(inner).__name__}'s last convolutional map, {found.name!r}, is no last stage: parameterized "
            f"layers after it ({later[0].name!r}, ...) work on {later[0].shape[1:]} token sequences or maps that "
            "cgc does not recognize (it is a stem, or inside such blocks); pass target_layer= of a layer at "
            "the end of the blocks and reshape= (layer output -> [B,C,h,w])"
        )
    return prefix + found.name


@dataclass
class _Run:
    """One module's run in the meta forward pass: event counts at its start and end, and the
    shape of its output (empty when it is not a tensor)."""

    name: str
    start: int
    end: int
    shape: tuple[int, ...]


def _positions(shape: tuple[int, ...]) -> int:
    """Positions (pixels or tokens) of an output: all but its batch and widest axis."""
    return math.prod(shape[1:]) // max(shape[1:]) if len(shape) >= 3 else 1


def _trace(inner: nn.Module, hw: tuple[int, int]) -> list[_Run]:
    """Every submodule's runs in one forward pass of two ``hw`` images on the meta device, in the
    order they finish."""
    runs: list[_Run] = []
    started: dict[str, list[int]] = {}
    clock = itertools.count()

    def before(name):
        def hook(_module, _inp):
            started.setdefault(name, []).append(next(clock))

        return hook

    def after(name):
        def hook(_module, _inp, out):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            runs.append(_Run(name, started[name].pop(), next(clock), shape))

        return hook

    stand_ins = {
        name: torch.empty_like(t, device="meta")
        for name, t in [*inner.named_parameters(remove_duplicate=False), *inner.named_buffers(remove_duplicate=False)]
    }
    handles = []
    for name, module in inner.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(before(name)), module.register_forward_hook(after(name))]
    dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            # two images: a training-mode BatchNorm on a 1x1 map refuses a batch of one
            torch.func.functional_call(inner, stand_ins, (torch.empty(2, 3, *hw, dtype=dtype, device="meta"),))
    except (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError) as err:
        raise UnsupportedModel(
            f"could not find the CAM layer of {type(inner).__name__}: a forward pass of "
            f"{hw[0]}x{hw[1]} px images failed ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            "pass target_layer='dotted.module.name'"
        ) from err
    finally:
        for h in handles:
            h.remove()
    return runs


def _transformer_layer(inner: nn.Module, info: token_maps.Transformer, runs: list[_Run], hw) -> str:
    """The layer :func:`find_target_layer`'s rule picks in a recognized transformer, checked to
    run and to give a map of more than one position at ``hw``."""
    last, block = info.last_block(inner)
    if info.class_token_head:
        norm = next((n for n, m in block.named_children() if "norm" in type(m).__name__.lower()), None)
        if norm is None:
            raise UnsupportedModel(
                f"the last block of {type(inner).__name__}, {last!r}, has no norm to read: pass target_layer="
            )
        name = f"{last}.{norm}"
    else:
        name = info.final_norm or last
    shape = next((r.shape for r in reversed(runs) if r.name == name), None)
    if not shape:
        raise UnsupportedModel(f"{name!r} of {type(inner).__name__} did not run: pass target_layer=")
    try:
        h, w = info.tokens.to_map(torch.empty(shape, device="meta"), hw).shape[-2:]
    except UnsupportedModel as err:
        raise UnsupportedModel(
            f"{name!r} of {type(inner).__name__} cannot be read as a map: {err}; pass target_layer= and reshape="
        ) from None
    if h * w < 2:
        raise UnsupportedModel(
            f"{name!r} of {type(inner).__name__} is a {h}x{w} map at {hw[0]}x{hw[1]} px: too small for a "
            "heatmap; use larger images or pass target_layer= of an earlier layer"
        )
    return name


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

    A transformer layer's tokens or channels-last map is read as ``[B,C,h,w]`` with the layout
    :func:`cgc.token_maps.layer_layout` infers from the model, or with ``reshape``: a
    :class:`cgc.token_maps.TokenMap`, or a function ``layer output -> [B,C,h,w]`` that only
    moves values (as pytorch-grad-cam's ``reshape_transform``); ``layout`` is the reader used.
    The layers after the hooked one read the layer's output rebuilt from that map (same
    values), so the map is in the graph.

    The first call checks that the class scores depend on the map: when the map leaves tokens
    out (a class token) and the gradient of the summed logits reaches those tokens but is zero
    on every map position (the final norm of a class-token ViT), it raises
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
        self.target_layer = target_layer or find_target_layer(model)
        self.backend = backend
        self.channels_last = channels_last
        self.reshape = reshape
        module = get_module(model, self.target_layer)
        inner, prefix = _unwrap(model)
        self._info = token_maps.describe(inner)
        self.layout = token_maps.reader(reshape) or token_maps.layer_layout(
            inner, self.target_layer.removeprefix(prefix), self._info
        )
        if channels_last:
            to_channels_last(model)
        self._capturing = False
        self._checked = False
        self._image_hw: tuple[int, int] = (0, 0)
        self._math = None
        self._activations: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._keep)

    def with_model(self, model: nn.Module) -> GradCAM:
        """A new GradCAM with these settings on another model of the same architecture."""
        return GradCAM(
            model,
            self.target_layer,
            method=self.method,
            backend=self.backend,
            channels_last=self.channels_last,
            reshape=self.reshape,
        )

    def _keep(self, _module, _inp, out):
        """Forward hook: keep the layer's output as a map and hand the layers after it the
        output rebuilt from that map; run those layers with the math attention kernel."""
        if not self._capturing:
            return None
        if self._math is None:
            # the fused attention kernels have no double backward, which the CGC term needs
            self._math = sdpa_kernel(SDPBackend.MATH)
            self._math.__enter__()
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModel(
                f"target layer {self.target_layer!r} outputs a {type(out).__name__}, not a tensor; "
                "pass target_layer= of another layer"
            )
        try:
            maps = self.layout.to_map(out, self._image_hw)
        except UnsupportedModel as err:
            raise UnsupportedModel(
                f"target layer {self.target_layer!r} cannot be read as a [B,C,h,w] map: {err}; pass "
                "target_layer= of another layer, or reshape= (layer output -> [B,C,h,w])"
            ) from None
        self._activations, self._output = maps, out
        return self.layout.from_map(maps, out)

    # -- the two halves, usable separately by a training step that needs the logits first
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return ``(logits, activations)`` with the activations [B,C,h,w] in
        the graph."""
        if self._handle is None:
            raise RuntimeError("this GradCAM is closed; create a new one")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(
                f"GradCAM expects a non-empty image batch [B,C,H,W], got {getattr(x, 'shape', type(x).__name__)}"
            )
        self._image_hw = (x.shape[-2], x.shape[-1])
        why = self._info.refuses(self._image_hw) if self._info is not None else None
        if why:
            raise ConfigError(
                f"{type(_unwrap(self.model)[0]).__name__} cannot take {x.shape[-2]}x{x.shape[-1]} px images: {why}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._capturing = True
        try:
            with torch.enable_grad():
                logits = self.model(x)
        finally:
            self._capturing = False
            if self._math is not None:
                self._math.__exit__(None, None, None)
                self._math = None
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
        if not self._checked and acts.numel() != out.numel():
            self._check_scores_reach(logits, acts, out)
        self._checked = True
        return logits, acts

    def _check_scores_reach(self, logits: torch.Tensor, acts: torch.Tensor, out: torch.Tensor) -> None:
        """Refuse a map that the class scores do not depend on while the tokens it leaves out
        (the class token) carry their whole gradient."""
        g_map, g_out = torch.autograd.grad(logits.sum(), (acts, out), retain_graph=True, allow_unused=True)
        if (g_map is None or not g_map.any()) and g_out is not None and g_out.any():
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
