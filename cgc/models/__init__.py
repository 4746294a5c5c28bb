"""The model factory, one module per family: the compact CNN (:mod:`.compact`), torchvision
(:mod:`.from_torchvision`), timm (:mod:`.from_timm`) and Hugging Face ``transformers``
(:mod:`.from_huggingface`); :mod:`.sizing` resizes any family's transformers. Each family
module builds its models, recognizes its transformers (:func:`describe`: a
:class:`cgc.structure.TransformerLayout`) and resamples their weights to another image size.

Here: a compact CNN that trains on a CPU in minutes, any torchvision classifier by
name, any timm model (``timm:NAME``) or any Hugging Face ``transformers`` image classifier
(``hf:NAME_OR_PATH``, a hub name or a ``save_pretrained`` folder), with the classifier head
sized for the dataset and optional weights. Vision transformers are built for the dataset's
image size (see :func:`build_model`), their weights resampled to it.

Order matters and is fixed here: build -> load ImageNet/local weights -> replace the head for
the dataset's classes. The training script builds the optimizer and restores checkpoints only
after :func:`build_model` returns, so the new head is trained and a resumed head is kept (the
reference script got both wrong).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import structure
from ..errors import BadFile, ConfigError, MissingDependency, MissingFile, UnsupportedModel
from ..files import safe_load
from ..settings import Settings, setting
from . import from_huggingface, from_timm, from_torchvision
from .compact import COMPACT, NORMS, CompactCNN
from .sizing import MIN_GRID, patch_size_for, resample_patch_kernel

TIMM_PREFIX = from_timm.PREFIX
HF_PREFIX = from_huggingface.PREFIX

GROUP = "model"


@dataclasses.dataclass(frozen=True)
class ModelConfig(Settings):
    """The classifier a run trains and where its weights start (see each setting's doc)."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP,)

    arch: str = setting(
        COMPACT,
        "compact (a small CNN for CPUs), a torchvision classifier name, timm:NAME, or hf:NAME_OR_PATH (a Hugging "
        "Face image classifier: hub name or save_pretrained folder)",
        GROUP,
    )
    norm: str = setting("batch", "compact model: BatchNorm, or GroupNorm (no batch statistics)", GROUP, choices=NORMS)
    pretrained: bool = setting(
        False,
        "torchvision's / timm's ImageNet weights (needs the internet); hf:: the folder's or the hub model's weights",
        GROUP,
    )
    weights: str | None = setting(
        None,
        "local weights to start from (.pth/.pt state dict, .safetensors, a cgc checkpoint, or a save_pretrained folder)",
        GROUP,
    )
    new_head: bool = setting(
        False, "with --weights: a fresh classifier head even when the weights' head has the right size", GROUP
    )
    compact_stride: int = setting(
        8, "compact model: downsampling to the CAM layer (8: 8x8 heatmaps at 64 px; 4: 16x16)", GROUP, choices=(4, 8)
    )

    @property
    def starts_trained(self) -> bool:
        """Whether the model starts from weights (a fine-tuning)."""
        return self.pretrained or self.weights is not None

    def relations(self) -> list[str]:
        found = model_option_problems(
            self.arch, pretrained=self.pretrained, weights=self.weights, norm=self.norm, stride=self.compact_stride
        )
        if self.new_head and not self.weights:
            found.append("--new-head goes with --weights")
        if self.weights and not Path(self.weights).exists():
            found.append(f"--weights {self.weights}: no such file or folder")
        return found


def model_option_problems(arch: str, *, pretrained: bool, weights, norm: str, stride: int) -> list[str]:
    """What cannot work in these model options (of :class:`ModelConfig` and of
    :func:`build_model`), as flag-named messages."""
    found = []
    if pretrained and weights:
        found.append("use either --pretrained or --weights, not both")
    if arch != COMPACT and (norm != "batch" or stride != 8):
        found.append(f"--norm and --compact-stride are options of the compact model; {arch} keeps its own")
    if arch == COMPACT and pretrained:
        found.append("the compact model has no pretrained weights; use --weights PATH")
    if arch in (HF_PREFIX, TIMM_PREFIX):
        found.append(f"--arch {arch} needs a name after the colon")
    return found


def build_from(config: ModelConfig, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The classifier of a run's model section (:func:`build_model`)."""
    return build_model(
        config.arch,
        num_classes,
        image_size=image_size,
        pretrained=config.pretrained,
        weights=config.weights,
        norm=config.norm,
        stride=config.compact_stride,
        new_head=config.new_head,
    )


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of the final classification layer: the last ``nn.Linear``
    (or 1x1 ``nn.Conv2d`` for SqueezeNet-style heads) in module order."""
    head = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and name.startswith("classifier")
        ):
            head = (name, module)
    if head is None:
        raise UnsupportedModel(f"cannot find a classifier head (nn.Linear) in {type(model).__name__}")
    return head


def head_names(model: nn.Module) -> list[str]:
    """Dotted names of the classification layers: :func:`classifier_head`'s, and for timm's
    distilled DeiT, which averages two heads, ``head`` (class token) and ``head_dist``
    (distillation token), and Hugging Face's (``cls_classifier``, ``distillation_classifier``)."""
    name, _ = classifier_head(model)
    if name == "head_dist" and isinstance(getattr(model, "head", None), nn.Linear):
        return ["head", name]
    if name == "distillation_classifier" and isinstance(getattr(model, "cls_classifier", None), nn.Linear):
        return ["cls_classifier", name]  # Hugging Face's DeiT with its teacher's head
    return [name]


def replace_head(model: nn.Module, num_classes: int, *, fresh: bool = False) -> nn.Module:
    """Swap the classifier head(s) (:func:`head_names`) for freshly initialized ones with
    ``num_classes`` outputs (kept when they already have that many, unless ``fresh``); a
    Hugging Face model's config counts the new classes too."""
    for name in head_names(model):
        old = model.get_submodule(name)
        out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
        if out == num_classes and not fresh:
            continue
        if isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, 1)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    if from_huggingface.is_model(model):
        from_huggingface.set_classes(model, num_classes)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain state dict, or a cgc checkpoint (its
    ``model``), or a ``{"state_dict": ...}`` wrapper, loaded with ``weights_only=True``; or a
    ``.safetensors`` file (timm's and the Hugging Face hub's format); or a Hugging Face
    ``save_pretrained`` folder (its model's state dict). A ``module.`` prefix (DataParallel /
    DDP) is stripped."""
    path = Path(path)
    if path.is_dir():
        return from_huggingface.folder_state(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise MissingFile(f"weights file not found: {path}")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingDependency("safetensors", f"reading {path.name}") from None
        try:
            obj = load_file(str(path))
        except Exception as err:
            raise BadFile(f"cannot read weights {path}: not a valid safetensors file ({err})") from err
    else:
        obj = safe_load(path, "weights file")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadFile(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_model(
    arch: str,
    num_classes: int,
    *,
    image_size: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    norm: str = "batch",
    stride: int = 8,
    new_head: bool = False,
) -> nn.Module:
    """A classifier with ``num_classes`` outputs.

    ``arch`` is ``compact`` (with ``norm`` and ``stride``), any torchvision classification
    model name, ``timm:NAME`` for any timm model, or ``hf:NAME_OR_PATH`` for a Hugging Face
    image classifier (a hub name or a local ``save_pretrained`` folder; ``timm`` and
    ``transformers`` are optional). ``pretrained`` loads the library's default weights
    (downloaded: needs the internet or a filled cache; for ``hf:`` the folder's or the hub
    model's weights, without it the architecture of its config with fresh weights).
    ``weights`` loads a local state dict (or a ``save_pretrained`` folder), whose head may have
    the architecture's original class count (then it is replaced) or ``num_classes`` (then it
    is kept, unless ``new_head``: fine-tuning on other classes).

    ``image_size`` (the dataset's) builds a vision transformer for that size; CNNs ignore it.
    A ViT (timm's ViT/DeiT/EVA/BEiT, torchvision's ``vit_*``) keeps its patch size unless that
    does not divide the image size or leaves fewer than :data:`cgc.models.sizing.MIN_GRID` tokens per side; then
    it gets the largest smaller patch that does (:func:`cgc.models.sizing.patch_size_for`: 16 px patches at 64 px
    become 8 px, an 8x8 grid); timm's ViTs and EVAs are built with ``dynamic_img_size`` (the
    grid follows the input, so they also take other multiples of the patch). A Swin takes
    multiples of 32 px from 64 px (timm's is built with
    ``img_size`` and ``dynamic_img_size``, its windows shrinking to its stages' maps;
    torchvision's takes any size as built). Weights made at another size (``pretrained``,
    ``weights``) are resampled to the model: timm's own ``checkpoint_filter_fn`` of the model's
    family (position embeddings, patch kernel, relative position tables), torchvision's
    ``interpolate_embeddings`` and a pseudo-inverse resize of the patch kernel (FlexiViT's) for
    its ViTs. A Hugging Face ViT, DeiT, BEiT or DINOv2 gets the same patch rule, a Swin the same
    sizes with its window shrunk to its last stage's map when that is smaller (its stages must
    each hold a whole window); their configs are rebuilt for the size and the weights resampled
    (position embeddings, patch kernel, relative position tables). A size a model cannot take is
    a :class:`cgc.errors.ConfigError`.
    """
    problems = model_option_problems(arch, pretrained=pretrained, weights=weights, norm=norm, stride=stride)
    if problems:
        raise ConfigError("; ".join(problems))
    if arch == COMPACT:
        model: nn.Module = CompactCNN(num_classes, norm=norm, stride=stride)
    elif arch.startswith(TIMM_PREFIX):
        model = from_timm.build(arch[len(TIMM_PREFIX) :], pretrained, image_size)
    elif arch.startswith(HF_PREFIX):
        model = from_huggingface.build(arch[len(HF_PREFIX) :], pretrained, image_size, load_weights)
    else:
        model = from_torchvision.build(arch, pretrained, image_size, load_weights)
    if weights is not None:
        state = load_state_dict_file(weights)
        head_name, _ = classifier_head(model)
        head_w = state.get(f"{head_name}.weight")
        if head_w is not None:
            replace_head(model, head_w.shape[0])
        load_weights(model, fit_state(model, state), weights)
        if new_head:
            replace_head(model, num_classes, fresh=True)
    return replace_head(model, num_classes)


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` resampled to ``model``'s image and patch size where ``model`` is a vision
    transformer (:func:`describe`), by its family's rule; other models' states are returned as
    they are."""
    if describe(model) is None:
        return state
    if from_huggingface.is_model(model):
        return from_huggingface.fit_state(model, state)
    if from_timm.is_model(model):
        return from_timm.fit_state(model, state)
    return from_torchvision.fit_state(model, state)


def load_weights(model: nn.Module, state: dict, source) -> None:
    """Load ``state`` into ``model`` exactly (every key, every shape), or say what does not fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()
        raise UnsupportedModel(
            f"weights in {source} do not fit {type(model).__name__}: {' '.join(line.strip() for line in first[:3])}"
        ) from err
    if missing or unexpected:
        raise UnsupportedModel(
            f"weights in {source} do not fit {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def describe(model: nn.Module) -> structure.TransformerLayout | None:
    """The layout of a vision transformer that one of the families recognizes (timm's ViT, DeiT,
    EVA, BEiT, Swin; torchvision's ViT and Swin; Hugging Face's ViT, DeiT, BEiT, DINOv2, Swin),
    else None. Nothing is imported for it: a family whose library was never imported cannot
    have built ``model``."""
    for family in (from_timm, from_torchvision, from_huggingface):
        info = family.describe(model)
        if info is not None:
            return info
    return None


def find_target_layer(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> str:
    """Dotted name of the layer whose map explains ``model``'s class scores best: the rule of
    :func:`cgc.structure.target_layer_of` with the model's :func:`describe`."""
    return structure.target_layer_of(model, describe(structure.unwrap(model)[0]), input_size)


def imagenet_categories(arch: str, num_classes: int) -> list[str] | None:
    """torchvision's class names for ``arch``'s default weights, if they match the head (for a
    timm model with a 1000-class head: ImageNet-1k's, in the order timm uses too)."""
    if arch.startswith(HF_PREFIX):
        return None
    return from_torchvision.imagenet_categories("resnet50" if arch.startswith(TIMM_PREFIX) else arch, num_classes)


def load_arch(
    arch: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, list[str], int]:
    """``(model, class names, image size)`` of ``arch`` with its local ``weights`` (head size
    read from them unless ``num_classes``) or the library's ``pretrained`` ones (class names: a
    Hugging Face config's, or ImageNet's for 1000-class heads), built for ``image_size``
    (default: the size the model declares, else 224; see :func:`build_model`)."""
    num = num_classes
    if num is None and weights:
        head, _ = classifier_head(build_model(arch, 1000))
        w = load_state_dict_file(weights).get(f"{head}.weight")
        num = w.shape[0] if w is not None else 1000
    if num is None and pretrained and arch.startswith(HF_PREFIX):
        num = from_huggingface.load_config(arch[len(HF_PREFIX) :]).num_labels
    num = num or 1000
    model = build_model(arch, num, image_size=image_size, pretrained=pretrained, weights=weights)
    named = from_huggingface.class_names(model, num) if from_huggingface.is_model(model) else None
    classes = named or imagenet_categories(arch, num) or [f"class {i}" for i in range(num)]
    size = image_size or structure.declared_size(model, describe(model)) or (224, 224)
    return model, classes, structure.size_pair(size)[0]


__all__ = [
    "COMPACT",
    "HF_PREFIX",
    "MIN_GRID",
    "NORMS",
    "TIMM_PREFIX",
    "CompactCNN",
    "ModelConfig",
    "build_from",
    "build_model",
    "classifier_head",
    "describe",
    "find_target_layer",
    "fit_state",
    "head_names",
    "imagenet_categories",
    "load_arch",
    "load_state_dict_file",
    "load_weights",
    "model_option_problems",
    "patch_size_for",
    "replace_head",
    "resample_patch_kernel",
]
