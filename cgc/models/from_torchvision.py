"""torchvision's classifiers (``--arch NAME``): built by name, with their ImageNet weights and
class names; their ViTs built for the data's image size and recognized as transformers (a
:class:`cgc.structure.TransformerLayout`), their weights resampled to it."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MissingFile, UnknownName
from ..structure import TokenMap, TransformerLayout
from .compact import COMPACT
from .sizing import check_swin, patch_size_for, resample_patch_kernel


def build(arch: str, pretrained: bool, image_size: int | None, load) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UnknownName(
            "architecture", arch, [COMPACT, *known], hint="'compact', a torchvision classifier name, or timm:NAME"
        )
    model = _pretrained(arch) if pretrained else None
    if image_size is None:
        return model or torchvision.models.get_model(arch)
    with torch.device("meta"):
        probe = torchvision.models.get_model(arch)
    info = describe(probe)
    if info is not None and info.family == "swin":
        check_swin(arch, image_size)
    if info is None or info.family == "swin":
        return model or torchvision.models.get_model(arch)
    patch = patch_size_for(arch, image_size, probe.patch_size)
    ref = model or probe
    if (image_size, patch) == (ref.image_size, ref.patch_size):
        return model or torchvision.models.get_model(arch)
    vit = torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=patch,
        num_layers=len(probe.encoder.layers),
        num_heads=probe.encoder.layers[0].num_heads,
        hidden_dim=probe.hidden_dim,
        mlp_dim=probe.mlp_dim,
        dropout=probe.dropout,
        attention_dropout=probe.attention_dropout,
        representation_size=probe.representation_size,
        norm_layer=probe.norm_layer,
    )
    if model is not None:
        load(vit, fit_state(vit, model.state_dict()), f"torchvision's {arch} weights")
    return vit


def _pretrained(arch: str) -> nn.Module:
    import torchvision

    tv_weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=tv_weights)
    except Exception as err:
        raise MissingFile(
            f"could not fetch torchvision's pretrained weights for {arch} ({err}). Download "
            f"them where the internet works ({tv_weights.url}) and pass --weights PATH"
        ) from err


def describe(model: nn.Module) -> TransformerLayout | None:
    """The layout of torchvision's ``VisionTransformer`` and ``SwinTransformer`` (None: another model)."""
    from torchvision.models import SwinTransformer, VisionTransformer

    if isinstance(model, VisionTransformer):
        p, s = model.patch_size, model.image_size
        return TransformerLayout(
            "vit",
            "encoder.layers",
            "encoder.ln",
            "conv_proj",
            TokenMap("tokens", 1, (p, p)),
            True,
            (s, s),
            False,
            ("encoder", "encoder.layers"),
        )
    if isinstance(model, SwinTransformer):
        return TransformerLayout(
            "swin", "features", "norm", "features.0", TokenMap("nhwc"), False, None, True, ("features",)
        )
    return None


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` resampled to a torchvision ViT's image and patch size: its patch kernel
    (:func:`cgc.models.sizing.resample_patch_kernel`) and position embeddings (torchvision's
    ``interpolate_embeddings``); a Swin's window tables do not depend on the image size."""
    info = describe(model)
    if info is None or info.family != "vit":
        return state
    from torchvision.models.vision_transformer import interpolate_embeddings

    state = dict(state)
    kernel = state.get("conv_proj.weight")
    size = model.conv_proj.weight.shape[-2:]
    if kernel is not None and kernel.shape[-2:] != size:
        state["conv_proj.weight"] = resample_patch_kernel(kernel, tuple(size))
    if "encoder.pos_embedding" in state:
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    return state


def imagenet_categories(arch: str, num_classes: int) -> list[str] | None:
    """torchvision's class names for ``arch``'s default weights, if they match the head."""
    import torchvision

    try:
        cats = torchvision.models.get_model_weights(arch).DEFAULT.meta.get("categories")
    except (ValueError, KeyError, AttributeError):
        return None
    return list(cats) if cats and len(cats) == num_classes else None
