"""timm's models (``--arch timm:NAME``): built by name, with timm's pretrained weights; its ViT,
DeiT, EVA, BEiT and Swin built for the data's image size and recognized as transformers (a
:class:`cgc.structure.TransformerLayout`), their weights resampled by timm's own filters.
``timm`` is optional (``pip install timm``)."""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

from ..errors import ConfigError, MissingDependency, MissingFile, UnknownName
from ..structure import TokenMap, TransformerLayout, norm_name
from .sizing import check_swin, patch_size_for

PREFIX = "timm:"


def require():
    """The ``timm`` module (:class:`cgc.errors.MissingDependency` when it is absent)."""
    try:
        import timm
    except ImportError:
        raise MissingDependency("timm", "--arch timm:NAME") from None
    return timm


def build(name: str, pretrained: bool, image_size: int | None) -> nn.Module:
    """timm's model ``name``, for ``image_size`` images when it is a transformer cgc recognizes."""
    timm = require()
    known = timm.list_models()
    if name not in known and name.split(".")[0] not in known:
        raise UnknownName("timm architecture", name, known, hint="any name of timm.list_models()")
    kwargs = size_args(name, image_size) if image_size is not None else {}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if getattr(model, "num_classes", None) == 0:  # a headless default (e.g. EVA-02's MIM weights)
            model = timm.create_model(name, pretrained=pretrained, num_classes=1000, **kwargs)
        return model
    except Exception as err:
        if kwargs and isinstance(err, (AssertionError, ValueError, RuntimeError, TypeError)):
            raise ConfigError(f"timm cannot build {name} for {image_size} px images ({err})") from err
        if not pretrained:
            raise
        raise MissingFile(
            f"could not fetch timm's pretrained weights for {name} ({err}); download the "
            f"model's .safetensors where the internet works and pass --weights PATH"
        ) from err


def size_args(name: str, image_size: int) -> dict:
    """``create_model`` arguments that build timm's ``name`` for ``image_size`` (see
    :func:`cgc.models.build_model`): none for models that are not recognized transformers."""
    timm = require()
    try:
        with torch.device("meta"):
            probe = timm.create_model(name)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError):
        return {}  # built on the meta device or not, it is no transformer cgc knows
    info = describe(probe)
    if info is None:
        return {}
    args: dict = {"img_size": image_size}
    if any("dynamic_img_size" in inspect.signature(cls.__init__).parameters for cls in type(probe).__mro__[:-1]):
        args["dynamic_img_size"] = True
    if info.family == "swin":
        check_swin(f"timm:{name}", image_size)
        return args
    stride = info.tokens.stride[0]
    if type(probe.patch_embed).__name__ != "PatchEmbed":  # a CNN backbone before the patches
        if image_size % stride or image_size // stride < 2:
            raise ConfigError(f"timm:{name} takes multiples of {stride} px from {2 * stride} px, not {image_size}")
        return args
    patch = patch_size_for(f"timm:{name}", image_size, stride)
    if patch != stride:
        args["patch_size"] = patch
    return args


def describe(model: nn.Module) -> TransformerLayout | None:
    """The layout of timm's ``VisionTransformer`` (DeiT, distilled DeiT, register tokens), ``Eva``,
    ``Beit`` and ``SwinTransformer`` (v1, v2), and of their subclasses (None: another model)."""
    if "timm" not in sys.modules:
        return None
    import timm.models as tm

    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return None
    size = tuple(pe.img_size) if getattr(pe, "img_size", None) is not None else None
    dynamic = bool(getattr(model, "dynamic_img_size", False)) or size is None
    if isinstance(model, (tm.VisionTransformer, tm.Eva, tm.Beit)):
        stride = tuple(pe.feat_ratio(as_scalar=False)) if hasattr(pe, "feat_ratio") else tuple(pe.patch_size)
        tokens = TokenMap("tokens", model.num_prefix_tokens, stride, bool(getattr(pe, "dynamic_img_pad", False)))
        return TransformerLayout(
            "vit",
            "blocks",
            norm_name(model, "norm"),
            "patch_embed",
            tokens,
            model.global_pool == "token",
            size,
            dynamic,
            ("blocks",),
        )
    if isinstance(model, (tm.SwinTransformer, tm.SwinTransformerV2)):
        tokens = TokenMap("nhwc", stride=tuple(pe.patch_size))
        return TransformerLayout(
            "swin", "layers", norm_name(model, "norm"), "patch_embed", tokens, False, size, dynamic, ("layers",)
        )
    return None


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` resampled to a timm model by the ``checkpoint_filter_fn`` of its family's module
    (position embeddings, patch kernel, relative position tables); as it is without one."""
    family = next((c.__module__ for c in type(model).__mro__ if c.__module__.startswith("timm.")), None)
    fit = getattr(sys.modules[family], "checkpoint_filter_fn", None) if family is not None else None
    return fit(state, model) if fit is not None else state


def is_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of timm's."""
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)
