"""Model factory: a compact CNN that trains on a CPU in minutes, any torchvision classifier by
name, or any timm CNN (``timm:NAME``), with the classifier head sized for the dataset and
optional weights.

Order matters and is fixed here: build -> load ImageNet/local weights -> replace the head for
the dataset's classes. The training script builds the optimizer and restores checkpoints only
after :func:`build_model` returns, so the new head is trained and a resumed head is kept (the
reference script got both wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .checkpoint import safe_load
from .errors import BadFile, ConfigError, MissingDependency, MissingFile, UnknownName, UnsupportedModel

COMPACT = "compact"
TIMM_PREFIX = "timm:"
NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with 8 groups (no batch statistics: the same result for any
    split of a batch over processes, and stable with few images per device)."""
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels), channels)


def _conv_norm(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), _norm(norm, cout), nn.ReLU(inplace=True))


class CompactCNN(nn.Module):
    """Four 3x3 conv-norm-ReLU layers with 2x2 max-pooling after the first three (stride 8),
    global average pooling, a linear head. ``norm``: ``batch`` (BatchNorm) or ``group``
    (GroupNorm, for runs that must not depend on how a batch is split over processes).
    ``stride`` 4 drops the third pooling: 16x16 heatmaps at 64 px (four times the compute of the
    last stage).

    ``features`` is the last convolutional stage (the Grad-CAM layer): at 64 px input it is an
    8x8 map, so heatmaps have enough resolution to be right or wrong about a small object.
    Max-pooling (rather than strided convolutions) lets small objects win early in training:
    on the synthetic dataset it leaves the initial accuracy plateau several times sooner.
    Global pooling + linear head make pooled and element-wise Grad-CAM coincide, as for ResNet.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, norm: str = "batch", stride: int = 8):
        super().__init__()
        if norm not in NORMS:
            raise UnknownName("norm", norm, NORMS)
        if stride not in (4, 8):
            raise ConfigError(f"the compact model's stride is 4 or 8, got {stride}")
        w = width
        self.stem = nn.Sequential(_conv_norm(3, w, norm), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(_conv_norm(w, 2 * w, norm), nn.MaxPool2d(2))
        third = [nn.MaxPool2d(2)] if stride == 8 else []
        self.features = nn.Sequential(_conv_norm(2 * w, 4 * w, norm), *third, _conv_norm(4 * w, 4 * w, norm))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stage2(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def list_architectures() -> list[str]:
    """Names accepted by :func:`build_model` besides ``timm:NAME``."""
    import torchvision

    return [COMPACT] + sorted(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        raise MissingDependency("timm", "--arch timm:NAME") from None
    return timm


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


def replace_head(model: nn.Module, num_classes: int, *, fresh: bool = False) -> nn.Module:
    """Swap the classifier head for a freshly initialized one with ``num_classes`` outputs
    (kept when it already has that many, unless ``fresh``)."""
    name, old = classifier_head(model)
    out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    if out == num_classes and not fresh:
        return model
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain state dict, or a cgc checkpoint (its
    ``model``), or a ``{"state_dict": ...}`` wrapper, loaded with ``weights_only=True``; or a
    ``.safetensors`` file (timm's and the Hugging Face hub's format). A ``module.`` prefix
    (DataParallel / DDP) is stripped."""
    path = Path(path)
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
    pretrained: bool = False,
    weights: str | Path | None = None,
    norm: str = "batch",
    stride: int = 8,
    new_head: bool = False,
) -> nn.Module:
    """A classifier with ``num_classes`` outputs.

    ``arch`` is ``compact`` (with ``norm`` and ``stride``), any torchvision classification
    model name, or ``timm:NAME`` for any timm model (``timm`` is optional). ``pretrained``
    loads the library's default weights (downloaded: needs the internet or a filled cache).
    ``weights`` loads a local state dict, whose head may have the architecture's original
    class count (then it is replaced) or ``num_classes`` (then it is kept, unless
    ``new_head``: fine-tuning on other classes).
    """
    if pretrained and weights:
        raise ConfigError("use either --pretrained or --weights, not both")
    if (norm != "batch" or stride != 8) and arch != COMPACT:
        raise ConfigError(f"--norm and --compact-stride are options of the compact model; {arch} keeps its own")
    if arch == COMPACT:
        if pretrained:
            raise ConfigError("the compact model has no pretrained weights; use --weights PATH")
        model: nn.Module = CompactCNN(num_classes, norm=norm, stride=stride)
    elif arch.startswith(TIMM_PREFIX):
        model = _build_timm(arch[len(TIMM_PREFIX) :], pretrained)
    else:
        model = _build_torchvision(arch, pretrained)
    if weights is not None:
        state = load_state_dict_file(weights)
        head_name, _ = classifier_head(model)
        head_w = state.get(f"{head_name}.weight")
        if head_w is not None:
            replace_head(model, head_w.shape[0])
        _load(model, state, weights)
        if new_head:
            replace_head(model, num_classes, fresh=True)
    return replace_head(model, num_classes)


def _build_torchvision(arch: str, pretrained: bool) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UnknownName(
            "architecture", arch, [COMPACT, *known], hint="'compact', a torchvision classifier name, or timm:NAME"
        )
    if not pretrained:
        return torchvision.models.get_model(arch)
    tv_weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=tv_weights)
    except Exception as err:
        raise MissingFile(
            f"could not fetch torchvision's pretrained weights for {arch} ({err}). Download "
            f"them where the internet works ({tv_weights.url}) and pass --weights PATH"
        ) from err


def _build_timm(name: str, pretrained: bool) -> nn.Module:
    timm = _timm()
    known = timm.list_models()
    if name not in known and name.split(".")[0] not in known:
        raise UnknownName("timm architecture", name, known, hint="any name of timm.list_models()")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as err:
        if not pretrained:
            raise
        raise MissingFile(
            f"could not fetch timm's pretrained weights for {name} ({err}); download the "
            f"model's .safetensors where the internet works and pass --weights PATH"
        ) from err


def _load(model: nn.Module, state: dict, source) -> None:
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


def imagenet_categories(arch: str, num_classes: int) -> list[str] | None:
    """torchvision's class names for ``arch``'s default weights, if they match the head (for a
    timm model with a 1000-class head: ImageNet-1k's, in the order timm uses too)."""
    import torchvision

    if arch.startswith(TIMM_PREFIX):
        arch = "resnet50"
    try:
        cats = torchvision.models.get_model_weights(arch).DEFAULT.meta.get("categories")
    except (ValueError, KeyError, AttributeError):
        return None
    return list(cats) if cats and len(cats) == num_classes else None


@dataclass
class LoadedModel:
    """A model ready to explain: its class names, input size, CAM layer (None: find it), the
    CAM method it was trained with, where it came from (for reports) and whether that was a
    cgc checkpoint (whose classes must be the evaluation data's)."""

    model: nn.Module
    classes: list[str]
    image_size: int
    target_layer: str | None
    method: str
    train_args: dict
    source: str
    from_checkpoint: bool


def load_model(
    *,
    checkpoint_path: str | Path | None = None,
    arch: str | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
) -> LoadedModel:
    """A cgc checkpoint's model (its classes, image size, CAM layer and method), or ``arch``
    with its local ``weights`` (head size read from them unless ``num_classes``) or the
    library's ``pretrained`` ones (ImageNet class names for 1000-class heads)."""
    if checkpoint_path:
        ckpt = checkpoint.load(checkpoint_path)
        targs = ckpt["config"]
        num = len(ckpt.get("classes") or []) or targs.get("num_classes")
        classes = list(ckpt.get("classes") or [f"class {i}" for i in range(num)])
        model = build_model(
            targs.get("arch", COMPACT), num, norm=targs.get("norm", "batch"), stride=targs.get("compact_stride", 8)
        )
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise UnsupportedModel(
                f"the weights in {checkpoint_path} do not fit {targs.get('arch')}: {str(err).splitlines()[0]}"
            ) from err
        size = ckpt["image_size"]
        return LoadedModel(
            model,
            classes,
            size,
            ckpt.get("target_layer"),
            ckpt["cam"],
            targs,
            str(checkpoint_path),
            True,
        )
    num = num_classes
    if num is None and weights:
        head, _ = classifier_head(build_model(arch, 1000))
        w = load_state_dict_file(weights).get(f"{head}.weight")
        num = w.shape[0] if w is not None else 1000
    num = num or 1000
    model = build_model(arch, num, pretrained=pretrained, weights=weights)
    classes = imagenet_categories(arch, num) or [f"class {i}" for i in range(num)]
    return LoadedModel(
        model, classes, 224, None, "gradcam", {"arch": arch}, str(weights or f"{arch} (pretrained)"), False
    )
