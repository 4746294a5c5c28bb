"""Hugging Face ``transformers`` image classifiers as cgc models (``--arch hf:NAME_OR_PATH``):
their configs and weights, from a local ``save_pretrained`` folder or the hub, and the folder a
run writes back. ``transformers`` is optional (``pip install transformers``, or the ``hf``
extra); nothing here imports it before a Hugging Face model is asked for.

:mod:`cgc.models` builds the models (sized for the data, with heads for its classes) and
:mod:`cgc.structure` recognizes their transformers; this module only talks to ``transformers``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from torch import nn

from .errors import MissingDependency, MissingFile, UnsupportedModel

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
