"""What cgc knows of a model's structure whatever its family: which layer explains it, how that
layer's output is read as a map, and how its weights are laid out in memory. What is known of
each family (which classes are transformers, where their blocks are) lives with the family, in
:mod:`cgc.models`, and reaches here as a :class:`TransformerLayout`.

- **Reading a layer as a map.** A CAM needs the layer's output as ``[B,C,h,w]``. A CNN's layers
  give one. A vision transformer's give tokens ``[B,T,C]`` (the prefix tokens first: class,
  distillation, registers; then the ``h*w`` patch tokens row by row), and Swin's stages give
  channels-last maps ``[B,h,w,C]`` (Hugging Face's: tokens, each stage at its own stride). A
  :class:`TokenMap` names one of these layouts and reads it as a map with a slice, view and
  permute, so the map stays in the autograd graph (the CGC term differentiates through it
  twice); :class:`CustomReshape` does the same with a function the user writes, as
  pytorch-grad-cam's ``reshape_transform`` (:func:`map_reader` picks the one ``reshape=``
  asks for).
- **A transformer's layout.** The layout is decided by the model's structure, never from a shape
  alone (a ``[B,h,w,C]`` map with ``h == C`` reads either way): a :class:`TransformerLayout`
  (from :func:`cgc.models.describe`) says where the blocks, the final norm and the patch
  embedding are, how many prefix tokens there are, how many pixels each patch token covers (so
  the grid follows the input of a ``dynamic_img_size`` model) and which tokens the head reads.
  :func:`layer_layout` gives one layer's layout.
- **Finding the layer.** :func:`target_layer_of` applies a written rule to one traced forward
  pass on the meta device (:func:`trace`), at the size the model declares
  (:func:`declared_size`).
- **Reading the output.** :func:`logits_of` finds the class scores in whatever a model returns
  (a tensor, a Hugging Face ``ModelOutput``, a tuple); :func:`first_tensor` reads a layer's.
- **Memory format.** :func:`to_channels_last` stores a model's 4-D weights channels-last.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, UnknownName, UnsupportedModel

LAYOUTS = ("nchw", "nhwc", "tokens")
_FORMS = {"nchw": "[B,C,H,W]", "nhwc": "[B,H,W,C]", "tokens": "[B,tokens,C]"}


@dataclass(frozen=True)
class TokenMap:
    """How a layer's output is a map: ``nchw`` (already one), ``nhwc`` (channels last) or
    ``tokens`` ``[B,T,C]``: ``prefix`` tokens, then one token per ``stride`` pixels of the
    image, row by row (the grid of an ``H x W`` image is ``H // stride``, rounded up when the
    embedding pads the image to a multiple of the stride: ``pad``). A model that takes other
    image sizes takes multiples of ``stride`` (unless it pads)."""

    layout: str = "nchw"
    prefix: int = 0
    stride: tuple[int, int] = (1, 1)
    pad: bool = False

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"a token map's layout is one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` patch tokens of an image of ``image_hw`` pixels."""
        rnd = math.ceil if self.pad else math.floor
        return rnd(image_hw[0] / self.stride[0]), rnd(image_hw[1] / self.stride[1])

    def to_map(self, out: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """``out`` as ``[B,C,h,w]``: a view of it (:class:`cgc.errors.UnsupportedModel` when it
        does not have this layout, or a token count that does not fit the image's grid)."""
        want = 3 if self.layout == "tokens" else 4
        if out.dim() != want:
            raise UnsupportedModel(
                f"its output {tuple(out.shape)} is not a {self.layout.upper()} map ({want}-D {_FORMS[self.layout]})"
            )
        if self.layout == "nchw":
            return out
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        h, w = self.grid(image_hw)
        if out.shape[1] != self.prefix + h * w:
            raise UnsupportedModel(
                f"its {out.shape[1]} tokens do not fit {self.prefix} prefix tokens + a {h}x{w} grid "
                f"({image_hw[0]}x{image_hw[1]} px images at {self.stride[0]}x{self.stride[1]} px per token)"
            )
        return out[:, self.prefix :].unflatten(1, (h, w)).permute(0, 3, 1, 2)

    def from_map(self, maps: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The layer's output rebuilt from ``maps`` (same values), for the layers after it to
        read, so the class score depends on the map itself; None: ``maps`` is ``out``."""
        if self.layout == "nchw":
            return None
        if self.layout == "nhwc":
            return maps.permute(0, 2, 3, 1)
        tokens = maps.flatten(2).transpose(1, 2)  # a view of the patch tokens
        return torch.cat([out[:, : self.prefix], tokens], 1) if self.prefix else tokens


class CustomReshape:
    """A user's ``fn(layer output) -> [B,C,h,w]`` that only moves values (slices, views,
    permutes, as pytorch-grad-cam's ``reshape_transform``). To rebuild the layer's output from
    the map it applies ``fn`` to the output's element indices and scatters the map back there."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def to_map(self, out: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        try:
            maps = self.fn(out)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ConfigError(f"reshape= failed on an output of shape {tuple(out.shape)}: {err}") from err
        if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[0] != out.shape[0]:
            raise ConfigError(
                f"reshape= must turn the output {tuple(out.shape)} into [B,C,h,w] with B = {out.shape[0]}, "
                f"got {getattr(maps, 'shape', type(maps).__name__)}"
            )
        return maps

    def from_map(self, maps: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        index = self.fn(torch.arange(out.numel(), device=out.device).view(out.shape))
        if index.dtype != torch.int64 or index.shape != maps.shape:
            raise ConfigError(
                "reshape= must only move values (slices, views, permutes): applied to the output's "
                f"element indices it gave {index.dtype} {tuple(index.shape)}, not int64 {tuple(maps.shape)}"
            )
        return out.flatten().scatter(0, index.flatten(), maps.flatten()).view_as(out)

    def __repr__(self) -> str:
        return f"CustomReshape({self.fn!r})"


def map_reader(reshape) -> TokenMap | CustomReshape | None:
    """The reader of ``reshape=``: None, a :class:`TokenMap`, or a function (wrapped)."""
    if reshape is None or isinstance(reshape, (TokenMap, CustomReshape)):
        return reshape
    if not callable(reshape):
        raise ConfigError(f"reshape= must be a function (layer output -> [B,C,h,w]) or a TokenMap, got {reshape!r}")
    return CustomReshape(reshape)


@dataclass(frozen=True)
class TransformerLayout:
    """The structure of a recognized vision transformer (dotted module names of the model).

    ``blocks``: the container of its blocks (Swin: of its stages), last child last;
    ``final_norm``: the norm after the last block (None when it is an ``nn.Identity``);
    ``embedding``: the patch embedding (the stem); ``tokens``: the layout of every layer after
    the embedding; ``class_token_head``: the head reads the class token (alone, or beside the
    mean of the patch tokens as DINOv2's does), not only pooled patch tokens;
    ``image_size``: the size it was built for (None: any), ``dynamic``: it takes other sizes
    (multiples of the stride) too; ``cascade``: containers whose children are its
    randomization steps (from the head down: the blocks one by one); ``grids``: layers whose
    token grid is coarser than ``tokens``' (Hugging Face's Swin, whose stages give tokens):
    ``(dotted name, stride)``, for that layer and everything in it, the longest name wins."""

    family: str
    blocks: str
    final_norm: str | None
    embedding: str
    tokens: TokenMap
    class_token_head: bool
    image_size: tuple[int, int] | None
    dynamic: bool
    cascade: tuple[str, ...]
    grids: tuple[tuple[str, tuple[int, int]], ...] = ()

    def layout(self, name: str) -> TokenMap:
        """The layout of the output of layer ``name`` (one after the patch embedding)."""
        found = [(n, s) for n, s in self.grids if name == n or name.startswith(n + ".")]
        if not found:
            return self.tokens
        return dataclasses.replace(self.tokens, stride=max(found, key=lambda f: len(f[0]))[1])

    def last_block(self, model: nn.Module) -> tuple[str, nn.Module]:
        """``(dotted name, module)`` of the last block (Swin: the last stage)."""
        name, block = list(model.get_submodule(self.blocks).named_children())[-1]
        return f"{self.blocks}.{name}", block

    def refuses(self, image_hw: tuple[int, int]) -> str | None:
        """Why the model cannot take ``image_hw`` images (None: it can)."""
        if self.image_size is not None and not self.dynamic and tuple(image_hw) != self.image_size:
            h, w = self.image_size
            return f"it was built for {h}x{w} px images"
        if not self.tokens.pad:
            sh, sw = self.tokens.stride
            if image_hw[0] % sh or image_hw[1] % sw:
                return f"its image sides must be multiples of its {sh}x{sw} px patches"
        return None


def logits_of(output) -> torch.Tensor:
    """The class scores in a model's ``output``: the output itself when it is a tensor, its
    ``logits`` (a Hugging Face ``ModelOutput``, a dict), or the first element of a tuple or
    list; :class:`cgc.errors.UnsupportedModel` naming what the output holds otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if isinstance(logits, torch.Tensor):
        return logits
    held = f" with {', '.join(map(repr, output))}" if isinstance(output, Mapping) else ""
    raise UnsupportedModel(
        f"the model's output is a {type(output).__name__}{held}, without logits: cgc reads a tensor, the "
        "'logits' of a Hugging Face ModelOutput or dict, or the first element of a tuple"
    )


def size_pair(size) -> tuple[int, int]:
    """``(H, W)`` of a size given as one side or as two."""
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def declared_size(model: nn.Module, info: TransformerLayout | None = None) -> tuple[int, int] | None:
    """The input size ``(H, W)`` ``model`` declares: a recognized transformer's (``info``), a
    Hugging Face config's ``image_size``, timm's ``pretrained_cfg`` / ``default_cfg``
    ``input_size`` or its ``img_size``; None when it declares none."""
    if info is not None and info.image_size is not None:
        return info.image_size
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            size = tuple(cfg["input_size"][-2:])
    if size is None:
        size = getattr(model, "img_size", None)
    return size_pair(size) if size else None


def norm_name(module: nn.Module, name: str) -> str | None:
    """``name``, or None when that module is an ``nn.Identity`` (a norm left out)."""
    return None if isinstance(module.get_submodule(name), nn.Identity) else name


def layer_layout(model: nn.Module, name: str, info: TransformerLayout | None) -> TokenMap:
    """The layout of layer ``name``'s output: ``nchw`` for convolutions and for models that are
    no recognized transformer (``info`` None), the transformer's token layout for every layer
    after its patch embedding. Layers inside the patch embedding other than its convolution are
    refused (:class:`cgc.errors.UnsupportedModel`): the stem is no CAM layer."""
    module = model.get_submodule(name)
    if info is None or isinstance(module, nn.modules.conv._ConvNd):
        return TokenMap("nchw")
    if name == info.embedding or name.startswith(info.embedding + "."):
        raise UnsupportedModel(
            f"layer {name!r} is part of {type(model).__name__}'s patch embedding (the stem: its maps are "
            "edge maps); pass target_layer= of a later layer, or reshape= (layer output -> [B,C,h,w])"
        )
    return info.layout(name)


# ----------------------------------------------------------------------------- the CAM layer
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


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """``(inner module, name prefix)`` of a DistributedDataParallel / DataParallel wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module."
    return model, ""


def target_layer_of(
    model: nn.Module, info: TransformerLayout | None, input_size: int | tuple[int, int] | None = None
) -> str:
    """Dotted name of the layer whose map explains ``model``'s class scores best.

    The rule: for a recognized vision transformer (``info``, its layout:
    :func:`cgc.models.describe`), the end
    of the blocks, on the side the head reads. A class-token head (timm ``global_pool ==
    'token'``: ViT, DeiT and distilled DeiT, register-token ViTs; torchvision's ViT; Hugging
    Face's ViT and DeiT) sees only the prefix tokens after the last block, so the final norm's
    patch tokens get no gradient: the layer is the last block's first norm, at the input side
    of the attention that mixes the patch tokens into the class token (``blocks.11.norm1``,
    ``encoder.layers.encoder_layer_11.ln_1``, ``vit.layers.11.layernorm_before``); so does
    DINOv2's, which adds the patch tokens' mean (the final norm would show only its share). A
    head that pools the patch tokens (Swin, timm ViT/EVA/BEiT with ``global_pool='avg'``,
    Hugging Face's BEiT) reads the final norm (the last block when it is an ``nn.Identity``). For any other model: the last module to finish that
    contains a convolution (or is a normalization or activation after one) and outputs a 4-D
    map with more than one pixel: ``layer4`` for ResNets, ``features`` for torchvision's
    VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt, ``bn2`` (norm + activation after
    ``conv_head``) for timm's EfficientNet, ``stages`` for timm's ConvNeXt.

    Never a stem: a layer after which parameterized layers still work on token sequences or
    spatial maps (a patch embedding or first convolution followed by unrecognized transformer
    blocks) is refused, as is a layer whose output is not a map of more than one position at
    this input size, with :class:`cgc.errors.UnsupportedModel` (pass ``target_layer=`` and,
    for tokens, ``reshape=``).

    Runs one forward pass of ``input_size`` images (default: the size the model declares,
    :func:`declared_size`, else 224) on the ``meta`` device through
    :func:`torch.func.functional_call` with meta stand-ins for every parameter and buffer: nothing is copied or computed, and the real
    model, its values and its mode are untouched.
    """
    inner, prefix = unwrap(model)
    size = input_size or declared_size(inner, info) or 224
    hw = (size, size) if isinstance(size, int) else tuple(size)
    runs = trace(inner, hw)
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


def first_tensor(out) -> torch.Tensor | None:
    """A layer's output as cgc reads it: the tensor, or the first element of a tuple or list
    (Hugging Face's blocks return ``(hidden states, attention weights, ...)``); None otherwise."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


@dataclass
class ModuleRun:
    """One module's run in the meta forward pass: event counts at its start and end, and the
    shape of its output (empty when it is not a tensor)."""

    name: str
    start: int
    end: int
    shape: tuple[int, ...]


def _positions(shape: tuple[int, ...]) -> int:
    """Positions (pixels or tokens) of an output: all but its batch and widest axis."""
    return math.prod(shape[1:]) // max(shape[1:]) if len(shape) >= 3 else 1


def trace(inner: nn.Module, hw: tuple[int, int]) -> list[ModuleRun]:
    """Every submodule's runs in one forward pass of two ``hw`` images on the meta device, in the
    order they finish."""
    runs: list[ModuleRun] = []
    started: dict[str, list[int]] = {}
    clock = itertools.count()

    def before(name):
        def hook(_module, _inp):
            started.setdefault(name, []).append(next(clock))

        return hook

    def after(name):
        def hook(_module, _inp, out):
            first = first_tensor(out)
            shape = tuple(first.shape) if first is not None else ()
            runs.append(ModuleRun(name, started[name].pop(), next(clock), shape))

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


def _transformer_layer(inner: nn.Module, info: TransformerLayout, runs: list[ModuleRun], hw) -> str:
    """The layer :func:`target_layer_of`'s rule picks in a recognized transformer, checked to
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
        h, w = info.layout(name).to_map(torch.empty(shape, device="meta"), hw).shape[-2:]
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
