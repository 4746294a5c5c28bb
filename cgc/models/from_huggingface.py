"""Hugging Face ``transformers`` image classifiers as cgc models (``--arch hf:NAME_OR_PATH``):
their configs and weights, from a local ``save_pretrained`` folder or the hub, and the folder a
run writes back. ``transformers`` is optional (``pip install transformers``, or the ``hf``
extra); nothing here imports it before a Hugging Face model is asked for.

Their ViT, DeiT, BEiT, DINOv2 and Swin are built for the data's image size and recognized as
transformers (a :class:`cgc.structure.TransformerLayout`, read from their configs), their
weights resampled to it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingDependency, MissingFile, UnsupportedModel
from ..structure import TokenMap, TransformerLayout, norm_name, size_pair
from .sizing import check_swin, patch_size_for, resample_patch_kernel, resize_positions, resize_relative_table

PREFIX = "hf:"
#: the ``save_pretrained`` folder a run of a Hugging Face model writes beside model.safetensors
FOLDER = "hf_model"


def require():
    """The ``transformers`` module (:class:`cgc.errors.MissingDependency` when it is absent)."""
    try:
        import transformers
    except ImportError:
        raise MissingDependency("transformers", "--arch hf:NAME_OR_PATH") from None
    return transformers


def is_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (never imports transformers)."""
    if sys.modules.get("transformers") is None:  # not imported, or blocked
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _local_folder(name: str) -> Path | None:
    """The folder ``name`` names on this machine, None for a hub name (``org/model``);
    :class:`cgc.errors.MissingFile` when it names a path that holds no model."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if not looks_local:
        return None
    if not (path / "config.json").is_file():
        why = "no such folder" if not path.exists() else "no config.json in it"
        raise MissingFile(
            f"{name} holds no Hugging Face model ({why}); pass a folder written by "
            "model.save_pretrained(folder), or a hub name"
        )
    return path


def _fetch_error(name: str, err: Exception) -> Exception:
    """The typed error of a failed load of ``name`` (a folder or a hub name)."""
    if isinstance(err, ValueError) and not isinstance(err, OSError):
        return UnsupportedModel(f"hf:{name} is no image classifier transformers can build: {_first_line(err)}")
    if _local_folder(name) is not None:
        return MissingFile(f"cannot load the Hugging Face model in {name}: {_first_line(err)}")
    return MissingFile(
        f"could not fetch hf:{name} ({_first_line(err)}); where the internet works, save it with "
        f"AutoModelForImageClassification.from_pretrained({name!r}).save_pretrained(DIR) and pass --arch hf:DIR"
    )


def load_config(name: str):
    """The config of ``name``: a ``save_pretrained`` folder or a hub name."""
    transformers = require()
    _local_folder(name)
    try:
        return transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        raise _fetch_error(name, err) from err


def new_model(config) -> nn.Module:
    """The image classifier of ``config``, with fresh weights."""
    transformers = require()
    try:
        return transformers.AutoModelForImageClassification.from_config(config)
    except ValueError as err:  # a model type without an image classifier
        raise UnsupportedModel(
            f"transformers has no image classifier for {config.model_type!r} models: {_first_line(err)}"
        ) from err


def pretrained_model(name: str) -> nn.Module:
    """The image classifier of ``name`` (folder or hub name) with its weights and its own head."""
    transformers = require()
    _local_folder(name)
    try:
        return transformers.AutoModelForImageClassification.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        raise _fetch_error(name, err) from err


def config_json(model: nn.Module) -> str:
    """``model``'s config as JSON (stored with a run's checkpoints: they rebuild it offline)."""
    return model.config.to_json_string(use_diff=False)


def config_from_json(text: str):
    """The config :func:`config_json` wrote."""
    values = json.loads(text)
    return require().AutoConfig.for_model(values.pop("model_type"), **values)


def set_classes(model: nn.Module, classes: int | list[str]) -> None:
    """Keep ``model.config``'s labels in step with its head: a class count (generic names) or
    the class names."""
    config = model.config
    if isinstance(classes, int):
        if config.num_labels != classes:
            config.num_labels = classes
        return
    config.id2label = dict(enumerate(classes))
    config.label2id = {c: i for i, c in enumerate(classes)}


def class_names(model: nn.Module, count: int) -> list[str] | None:
    """The names of ``model``'s config for its ``count`` classes (None: it has other or only
    transformers' placeholder names, ``LABEL_0``, ...)."""
    labels = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    names = [labels.get(i) for i in range(count)]
    if len(labels) != count or None in names or names == [f"LABEL_{i}" for i in range(count)]:
        return None
    return names


def save_folder(model: nn.Module, path: str | Path, classes: list[str]) -> Path:
    """``model.save_pretrained`` into the folder ``path``, its config naming ``classes``,
    replacing the folder whole (written beside it, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        set_classes(model, classes)
        # contiguous copies: safetensors refuses the channels-last weights of a CPU run
        model.save_pretrained(tmp, state_dict={k: v.contiguous() for k, v in model.state_dict().items()})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def folder_state(path: str | Path) -> dict:
    """The state dict of the model in a ``save_pretrained`` folder (its files may name the
    weights as another transformers version did; loading converts them)."""
    return pretrained_model(str(path)).state_dict()


def build(name: str, pretrained: bool, image_size: int | None, load) -> nn.Module:
    """The Hugging Face classifier ``name`` for ``image_size`` (None: the size of its config),
    with its own head: fresh weights, or its pretrained ones resampled to the size."""
    config = load_config(name)
    if image_size is not None:
        config = _sized(f"{PREFIX}{name}", config, image_size)
    model = new_model(config)
    if pretrained:
        source = pretrained_model(name)
        load(model, fit_state(model, source.state_dict()), f"{PREFIX}{name}")
    return model


def _sized(arch: str, config, image_size: int):
    """A copy of a Hugging Face ``config`` for ``image_size`` images (see :func:`build_model`);
    a CNN's config only declares the size."""
    config = copy.deepcopy(config)
    family = family_of(config)
    if family == "swin":
        check_swin(arch, image_size)
        last = image_size // (size_pair(config.patch_size)[0] << (len(config.depths) - 1))
        config.window_size = min(config.window_size, last)
    elif family == "vit":
        config.patch_size = patch_size_for(arch, image_size, size_pair(config.patch_size)[0])
    if family is not None or hasattr(config, "image_size"):
        config.image_size = image_size
    return config


def fit_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a Hugging Face model made at another image, patch or window size, resampled
    to ``model``: absolute position embeddings (bicubic, prefix tokens kept), the patch kernel
    (:func:`cgc.models.sizing.resample_patch_kernel`) and relative position tables (bicubic; their index buffers,
    which older transformers versions save, are the model's own)."""
    own = model.state_dict()
    config = model.config
    fitted = dict(state)
    for key, value in state.items():
        want = own.get(key)
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("position_embeddings") and value.dim() == 3:  # a ViT's: a patch grid, a CNN has none
            grid = tuple(s // p for s, p in zip(size_pair(config.image_size), size_pair(config.patch_size)))
            fitted[key] = resize_positions(value, want.shape[1] - grid[0] * grid[1], grid)
        elif key.endswith("patch_embeddings.projection.weight"):
            fitted[key] = resample_patch_kernel(value, tuple(want.shape[-2:]))
        elif key.endswith("relative_position_bias_table"):
            fitted[key] = resize_relative_table(value, want.shape[0])
        elif key.endswith("relative_position_index"):  # derived from the window: the model's own
            fitted[key] = want
    return fitted


#: Hugging Face ``model_type``s of the ViT family
_HF_VITS = ("vit", "deit", "beit", "dinov2", "dinov2_with_registers")


def _hf_vit_reading(config) -> tuple[bool, bool]:
    """``(class_token_head, dynamic)`` of a Hugging Face ViT-family config: BEiT's head reads the
    mean of the patch tokens unless its config says otherwise, every other head the class
    token; DINOv2 interpolates its position embeddings on every call, and a BEiT without
    position embeddings or tables takes any multiple of its patch, the others their own size."""
    if config.model_type == "beit":
        tables = (
            config.use_absolute_position_embeddings
            or config.use_relative_position_bias
            or config.use_shared_relative_position_bias
        )
        return not config.use_mean_pooling, not tables
    return True, config.model_type.startswith("dinov2")


def family_of(config) -> str | None:
    """``vit`` or ``swin``: the transformer family of a Hugging Face config that cgc recognizes
    (None: another model, a CNN for one)."""
    model_type = getattr(config, "model_type", None)
    return "vit" if model_type in _HF_VITS else "swin" if model_type == "swin" else None


def describe(model: nn.Module) -> TransformerLayout | None:
    """The structure of a Hugging Face ``transformers`` ViT, DeiT (with or without its teacher
    head), BEiT, DINOv2 (with or without registers) or Swin image classifier, read from its
    config and attributes; where the blocks are is found, not named, since transformers renames
    them between versions (``vit.encoder.layer`` became ``vit.layers``)."""
    if not is_model(model):
        return None
    config = model.config
    base = model.base_model_prefix if isinstance(getattr(model, model.base_model_prefix, None), nn.Module) else ""
    blocks = next((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.startswith(base)), None)
    if blocks is None or not hasattr(model.get_submodule(base), "layernorm"):
        return None
    norm = norm_name(model, f"{base}.layernorm" if base else "layernorm")
    parts = blocks.split(".")
    cascade = tuple(".".join(parts[: i + 1]) for i in range(len(parts)))
    embedding = f"{base}.embeddings" if base else "embeddings"
    patch, size = size_pair(config.patch_size), size_pair(config.image_size)
    if family_of(config) == "vit":
        class_token, dynamic = _hf_vit_reading(config)
        emb = model.get_submodule(embedding)
        prefix = sum(getattr(emb, a, None) is not None for a in ("cls_token", "distillation_token"))
        tokens = TokenMap("tokens", prefix + int(getattr(config, "num_register_tokens", 0) or 0), patch)
        return TransformerLayout("vit", blocks, norm, embedding, tokens, class_token, size, dynamic, cascade)
    if family_of(config) == "swin":
        grids = []
        for k, (name, stage) in enumerate(model.get_submodule(blocks).named_children()):
            grids.append((f"{blocks}.{name}.blocks", (patch[0] << k, patch[1] << k)))
            k += getattr(stage, "downsample", None) is not None
            grids.append((f"{blocks}.{name}", (patch[0] << k, patch[1] << k)))
        if norm is not None:
            grids.append((norm, grids[-1][1]))
        tokens = TokenMap("tokens", 0, patch, pad=True)
        return TransformerLayout("swin", blocks, norm, embedding, tokens, False, size, False, cascade, tuple(grids))
    return None
