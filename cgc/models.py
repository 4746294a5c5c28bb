"""Model factory: a compact CNN that trains on a CPU in minutes, any torchvision classifier by
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

import copy
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, huggingface, structure
from .config import model_option_problems
from .errors import BadFile, ConfigError, MissingDependency, MissingFile, UnknownName, UnsupportedModel
from .files import safe_load

COMPACT = "compact"
TIMM_PREFIX = "timm:"
HF_PREFIX = huggingface.PREFIX
NORMS = ("batch", "group")
#: a ViT built for an image size keeps at least this many patch tokens per side (see patch_size_for)
MIN_GRID = 7
#: Swin merges its 4 px patches three times: image sides that are multiples of 32 keep every
#: stage's map aligned with the image, and 64 px leave the last stage (the CAM layer) a 2x2 map
SWIN_MULTIPLE, SWIN_MIN_SIZE = 32, 64


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
    if huggingface.is_model(model):
        huggingface.set_classes(model, num_classes)
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: a plain state dict, or a cgc checkpoint (its
    ``model``), or a ``{"state_dict": ...}`` wrapper, loaded with ``weights_only=True``; or a
    ``.safetensors`` file (timm's and the Hugging Face hub's format); or a Hugging Face
    ``save_pretrained`` folder (its model's state dict). A ``module.`` prefix (DataParallel /
    DDP) is stripped."""
    path = Path(path)
    if path.is_dir():
        return huggingface.folder_state(path)
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
    does not divide the image size or leaves fewer than :data:`MIN_GRID` tokens per side; then
    it gets the largest smaller patch that does (:func:`patch_size_for`: 16 px patches at 64 px
    become 8 px, an 8x8 grid); timm's ViTs and EVAs are built with ``dynamic_img_size`` (the
    grid follows the input, so they also take other multiples of the patch). A Swin takes
    multiples of :data:`SWIN_MULTIPLE` from :data:`SWIN_MIN_SIZE` px (timm's is built with
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
        model = _build_timm(arch[len(TIMM_PREFIX) :], pretrained, image_size)
    elif arch.startswith(HF_PREFIX):
        model = _build_hf(arch[len(HF_PREFIX) :], pretrained, image_size)
    else:
        model = _build_torchvision(arch, pretrained, image_size)
    if weights is not None:
        state = load_state_dict_file(weights)
        head_name, _ = classifier_head(model)
        head_w = state.get(f"{head_name}.weight")
        if head_w is not None:
            replace_head(model, head_w.shape[0])
        _load(model, fit_state(model, state), weights)
        if new_head:
            replace_head(model, num_classes, fresh=True)
    return replace_head(model, num_classes)


def patch_size_for(arch: str, image_size: int, patch: int) -> int:
    """The patch size of a ViT built for ``image_size``: ``patch`` if it divides the image size
    into at least :data:`MIN_GRID` tokens per side, else the largest smaller size that does
    (:class:`cgc.errors.ConfigError` when none of 2 px or more does)."""
    for p in range(patch, 1, -1):
        if image_size % p == 0 and image_size // p >= MIN_GRID:
            return p
    q = min(patch, 8)
    raise ConfigError(
        f"{arch} cannot take {image_size} px images: no patch of 2 to {patch} px divides them into at least "
        f"{MIN_GRID} patches per side (multiples of {q} px from {MIN_GRID * q} px do)"
    )


def _check_swin(arch: str, image_size: int) -> None:
    if image_size < SWIN_MIN_SIZE or image_size % SWIN_MULTIPLE:
        raise ConfigError(
            f"{arch} cannot take {image_size} px images: a Swin needs a multiple of {SWIN_MULTIPLE} px "
            f"(its 4 px patches are merged three times), at least {SWIN_MIN_SIZE} px (a 2x2 map at its last stage)"
        )


def _build_torchvision(arch: str, pretrained: bool, image_size: int | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise UnknownName(
            "architecture", arch, [COMPACT, *known], hint="'compact', a torchvision classifier name, or timm:NAME"
        )
    model = _torchvision_pretrained(arch) if pretrained else None
    if image_size is None:
        return model or torchvision.models.get_model(arch)
    with torch.device("meta"):
        probe = torchvision.models.get_model(arch)
    info = structure.describe(probe)
    if info is not None and info.family == "swin":
        _check_swin(arch, image_size)
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
        _load(vit, fit_state(vit, model.state_dict()), f"torchvision's {arch} weights")
    return vit


def _torchvision_pretrained(arch: str) -> nn.Module:
    import torchvision

    tv_weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=tv_weights)
    except Exception as err:
        raise MissingFile(
            f"could not fetch torchvision's pretrained weights for {arch} ({err}). Download "
            f"them where the internet works ({tv_weights.url}) and pass --weights PATH"
        ) from err


def _build_timm(name: str, pretrained: bool, image_size: int | None) -> nn.Module:
    timm = _timm()
    known = timm.list_models()
    if name not in known and name.split(".")[0] not in known:
        raise UnknownName("timm architecture", name, known, hint="any name of timm.list_models()")
    kwargs = _timm_size_args(timm, name, image_size) if image_size is not None else {}
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


def _timm_size_args(timm, name: str, image_size: int) -> dict:
    """``create_model`` arguments that build timm's ``name`` for ``image_size`` (see
    :func:`build_model`): none for models that are not recognized transformers."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(name)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError):
        return {}  # built on the meta device or not, it is no transformer cgc knows
    info = structure.describe(probe)
    if info is None:
        return {}
    args: dict = {"img_size": image_size}
    if any("dynamic_img_size" in inspect.signature(cls.__init__).parameters for cls in type(probe).__mro__[:-1]):
        args["dynamic_img_size"] = True
    if info.family == "swin":
        _check_swin(f"timm:{name}", image_size)
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


def _build_hf(name: str, pretrained: bool, image_size: int | None) -> nn.Module:
    """The Hugging Face classifier ``name`` for ``image_size`` (None: the size of its config),
    with its own head: fresh weights, or its pretrained ones resampled to the size."""
    config = huggingface.load_config(name)
    if image_size is not None:
        config = _hf_sized(f"{HF_PREFIX}{name}", config, image_size)
    model = huggingface.new_model(config)
    if pretrained:
        source = huggingface.pretrained_model(name)
        _load(model, fit_state(model, source.state_dict()), f"{HF_PREFIX}{name}")
    return model


def _hf_sized(arch: str, config, image_size: int):
    """A copy of a Hugging Face ``config`` for ``image_size`` images (see :func:`build_model`);
    a CNN's config only declares the size."""
    config = copy.deepcopy(config)
    family = structure.hf_family(config)
    if family == "swin":
        _check_swin(arch, image_size)
        last = image_size // (structure.size_pair(config.patch_size)[0] << (len(config.depths) - 1))
        config.window_size = min(config.window_size, last)
    elif family == "vit":
        config.patch_size = patch_size_for(arch, image_size, structure.size_pair(config.patch_size)[0])
    if family is not None or hasattr(config, "image_size"):
        config.image_size = image_size
    return config


def _fit_hf_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a Hugging Face model made at another image, patch or window size, resampled
    to ``model``: absolute position embeddings (bicubic, prefix tokens kept), the patch kernel
    (:func:`resample_patch_kernel`) and relative position tables (bicubic; their index buffers,
    which older transformers versions save, are the model's own)."""
    own = model.state_dict()
    config = model.config
    grid = tuple(s // p for s, p in zip(structure.size_pair(config.image_size), structure.size_pair(config.patch_size)))
    fitted = dict(state)
    for key, value in state.items():
        want = own.get(key)
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("position_embeddings") and value.dim() == 3:
            fitted[key] = _resize_positions(value, want.shape[1] - grid[0] * grid[1], grid)
        elif key.endswith("patch_embeddings.projection.weight"):
            fitted[key] = resample_patch_kernel(value, tuple(want.shape[-2:]))
        elif key.endswith("relative_position_bias_table"):
            fitted[key] = _resize_relative_table(value, want.shape[0])
        elif key.endswith("relative_position_index"):  # derived from the window: the model's own
            fitted[key] = want
    return fitted


def _resize_positions(pos: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``[1, prefix + n*n, C]`` for a ``grid`` of patches."""
    side = math.isqrt(pos.shape[1] - prefix)
    patches = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :prefix], patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], 1)


def _resize_relative_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A relative position table ``[(2a-1)^2 + extra, heads]`` with ``rows`` rows: its
    ``(2a-1) x (2a-1)`` part resized (bicubic), its ``extra`` rows (BEiT's 3 class-token
    entries) kept."""

    def square(n: int) -> bool:
        return n > 0 and math.isqrt(n) ** 2 == n

    extra = next((e for e in (0, 3) if square(table.shape[0] - e) and square(rows - e)), None)
    if extra is None:
        raise UnsupportedModel(f"cannot resample a relative position table of {table.shape[0]} rows to {rows}")
    old, new = math.isqrt(table.shape[0] - extra), math.isqrt(rows - extra)
    grid = table[: old * old].T.reshape(1, -1, old, old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([grid.reshape(-1, new * new).T.to(table.dtype), table[old * old :]])


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` resampled to ``model``'s image and patch size where ``model`` is a vision
    transformer (:func:`cgc.structure.describe`); other models' states are returned as they are."""
    info = structure.describe(model)
    if info is None:
        return state
    if huggingface.is_model(model):
        return _fit_hf_state(model, state)
    family = next((c.__module__ for c in type(model).__mro__ if c.__module__.startswith("timm.")), None)
    if family is not None:
        fit = getattr(sys.modules[family], "checkpoint_filter_fn", None)
        return fit(state, model) if fit is not None else state
    if info.family != "vit":
        return state  # torchvision's Swin: window tables do not depend on the image size
    from torchvision.models.vision_transformer import interpolate_embeddings

    state = dict(state)
    kernel = state.get("conv_proj.weight")
    size = model.conv_proj.weight.shape[-2:]
    if kernel is not None and kernel.shape[-2:] != size:
        state["conv_proj.weight"] = resample_patch_kernel(kernel, tuple(size))
    if "encoder.pos_embedding" in state:
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    return state


def resample_patch_kernel(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A patch-embedding kernel ``[O,I,p,q]`` for ``size`` patches, as FlexiViT resizes one: the
    kernel whose response to a patch resized (bicubic, antialiased) to ``size`` is closest to
    the old kernel's response to the patch itself (pseudo-inverse of the resize)."""
    old = kernel.shape[-2:]
    basis = torch.eye(old[0] * old[1], dtype=torch.float32).view(-1, 1, *old)
    resize = F.interpolate(basis, size=size, mode="bicubic", antialias=True, align_corners=False).flatten(1)
    flat = kernel.float().flatten(2).transpose(0, 2)  # [p*q, I, O]
    new = torch.tensordot(torch.linalg.pinv(resize), flat, dims=1)  # [size, I, O]
    return new.transpose(0, 2).reshape(*kernel.shape[:2], *size).to(kernel.dtype)


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

    if arch.startswith(HF_PREFIX):
        return None
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
    CAM method it was trained with, where it came from (for reports), whether that was a
    cgc checkpoint (whose classes must be the evaluation data's) and a checkpoint's ``run_state``
    (where its run stood: :class:`cgc.engine.RunState` as a dict; None for other models)."""

    model: nn.Module
    classes: list[str]
    image_size: int
    target_layer: str | None
    method: str
    train_args: dict
    source: str
    from_checkpoint: bool
    run_state: dict | None = None


def load_model(
    *,
    checkpoint_path: str | Path | None = None,
    arch: str | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    image_size: int | None = None,
) -> LoadedModel:
    """A cgc checkpoint's model (its classes, image size, CAM layer and method; a transformer is
    rebuilt for the image size stored with it, a Hugging Face model from the config stored with
    it), or ``arch`` with its local ``weights`` (head size read from them unless
    ``num_classes``) or the library's ``pretrained`` ones (class names: a Hugging Face config's,
    or ImageNet's for 1000-class heads), built for ``image_size`` (default: the size the model
    declares, else 224; see :func:`build_model`)."""
    if checkpoint_path:
        return _from_checkpoint(checkpoint_path)
    num = num_classes
    if num is None and weights:
        head, _ = classifier_head(build_model(arch, 1000))
        w = load_state_dict_file(weights).get(f"{head}.weight")
        num = w.shape[0] if w is not None else 1000
    if num is None and pretrained and arch.startswith(HF_PREFIX):
        num = huggingface.load_config(arch[len(HF_PREFIX) :]).num_labels
    num = num or 1000
    model = build_model(arch, num, image_size=image_size, pretrained=pretrained, weights=weights)
    named = huggingface.class_names(model, num) if huggingface.is_model(model) else None
    classes = named or imagenet_categories(arch, num) or [f"class {i}" for i in range(num)]
    size = image_size or structure.declared_size(model) or (224, 224)
    return LoadedModel(
        model,
        classes,
        structure.size_pair(size)[0],
        None,
        "gradcam",
        {"arch": arch},
        str(weights or f"{arch} (pretrained)"),
        False,
    )


def _from_checkpoint(path: str | Path) -> LoadedModel:
    """The model of the cgc checkpoint ``path`` with what the checkpoint says of it."""
    ckpt = checkpoint.load(path)
    targs = ckpt["config"]
    num = len(ckpt.get("classes") or []) or targs.get("num_classes")
    classes = list(ckpt.get("classes") or [f"class {i}" for i in range(num)])
    size = ckpt["image_size"]
    if ckpt.get("hf_config"):  # rebuilt offline, as it trained, whatever became of its source
        model = replace_head(huggingface.new_model(huggingface.config_from_json(ckpt["hf_config"])), num)
    else:
        model = build_model(
            targs.get("arch", COMPACT),
            num,
            image_size=size,
            norm=targs.get("norm", "batch"),
            stride=targs.get("compact_stride", 8),
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UnsupportedModel(
            f"the weights in {path} do not fit {targs.get('arch')}: {str(err).splitlines()[0]}"
        ) from err
    return LoadedModel(
        model, classes, size, ckpt.get("target_layer"), ckpt["cam"], targs, str(path), True, ckpt.get("state")
    )
