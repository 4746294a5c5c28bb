"""One mechanism for every command's settings: a frozen dataclass whose fields carry their
default, a one-line doc, their flag and their check.

A command's config (:class:`cgc.config.TrainConfig`, :class:`cgc.evaluate.EvalConfig`,
:class:`cgc.explain.ExplainConfig`, :class:`cgc.study.StudyConfig`) subclasses
:class:`Settings` and declares each field with :func:`setting`. From that one list come the
command line (:meth:`Settings.parser`, with ``--config FILE``), the YAML file a command writes
and reads (:meth:`Settings.save`, :meth:`Settings.load`), the checks (:meth:`Settings.validate`:
every problem of the whole config in one :class:`cgc.errors.ConfigError`, before any work) and
the flag reference in the docs (:func:`flag_reference`, written by ``python -m
cgc.flag_reference``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError, MissingFile, UnknownName
from .files import write_text_atomic

# ----------------------------------------------------------------------------- checks
Check = Callable[[Any], str | None]


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be >= {low:g}"


def positive(v) -> str | None:
    return None if v is None or (math.isfinite(v) and v > 0) else "must be a finite number > 0"


def non_negative(v) -> str | None:
    return None if v is None or (math.isfinite(v) and v >= 0) else "must be a finite number >= 0"


def fraction(v) -> str | None:
    return None if v is None or 0 < v <= 1 else "must be in (0, 1]"


def unit_interval(v) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def area_range(v) -> str | None:
    low, high = v
    return None if 0 < low <= high <= 1 else "must be MIN MAX with 0 < MIN <= MAX <= 1"


def setting(
    default,
    doc: str,
    group: str,
    *,
    flag: str | None = None,
    choices: tuple | Callable[[], tuple] | None = None,
    check: Check | None = None,
    metavar=None,
    nargs: int | str | None = None,
    positional: bool = False,
):
    """A field of a :class:`Settings` class: its default, one-line doc, group (of ``--help`` and
    of the reference), flag (default ``--field-name``) and check. ``choices``: the values it
    takes, or a function giving them when asked (a registry that may grow). For tuple fields,
    ``nargs``: ``"append"`` (the flag repeated, one value each), ``"+"`` (one or more values
    after the flag), ``","`` (one comma-separated value) or a count (default: the tuple's
    length, or ``","`` for ``tuple[str, ...]``). ``positional``: given without a flag."""
    meta = dict(
        doc=doc,
        group=group,
        flag=flag,
        choices=choices,
        check=check,
        metavar=metavar,
        nargs=nargs,
        positional=positional,
    )
    return dataclasses.field(default=default, metadata=meta)


def choices_of(field: dataclasses.Field) -> tuple | None:
    """The values a setting takes, when they form a list (a registry's, read when asked)."""
    choices = field.metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


# ----------------------------------------------------------------------------- the base class
@dataclasses.dataclass(frozen=True)
class Settings:
    """The base of every command's settings: the class attributes name the command (``PROG``),
    its one-line ``DESCRIPTION`` and the ``GROUPS`` of its flags, in order; subclasses add
    their cross-field checks in :meth:`relations`."""

    PROG: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    GROUPS: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """Plain values (tuples as lists): what the YAML files and the checkpoints hold."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config"):
        """Settings from plain values (a YAML file, a checkpoint); unknown keys and values of
        the wrong type are a :class:`ConfigError` naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise UnknownName("setting", key, known, hint=f"in {source}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(v, hints[k], k, source) for k, v in values.items()})

    @classmethod
    def load(cls, path: str | Path, **required):
        """Settings from a YAML file (``OUT/config.yaml`` of a command, or one written by hand);
        ``required``: values for fields without a default that the file may lack."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise MissingFile(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot read {path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
        return cls.from_dict({**required, **values}, source=str(path))

    def save(self, path: str | Path) -> None:
        """Write the settings as YAML (atomically): ``--config`` on it reruns the same command."""
        import yaml

        header = f"# {self.PROG} --config THIS_FILE reruns this; flags given with it override these\n"
        write_text_atomic(header + yaml.safe_dump(self.to_dict(), sort_keys=False), path)

    def replace(self, **changes):
        """A copy with ``changes`` (field names, as ``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------- checks
    def problems(self, **context) -> list[str]:
        """Everything wrong with these settings, as flag-named messages (empty: they can run):
        each field's own check, then :meth:`relations` (``context``: what the command knows
        of where it runs)."""
        found = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                found.append(f"{flag_of(f)} must be a finite number, got {value}")
                continue
            choices = choices_of(f)
            values = value if _is_multi(f) and value is not None else (value,)
            wrong = [v for v in values if choices is not None and v not in choices and v is not None]
            if wrong and callable(meta["choices"]):  # a registry: suggest the closest names
                found.append(str(UnknownName(flag_of(f), wrong[0], choices)))
            elif wrong:
                found.append(f"{flag_of(f)} must be one of {', '.join(map(str, choices))}, got {wrong[0]!r}")
            elif meta["check"] is not None and (why := meta["check"](value)):
                found.append(f"{flag_of(f)} {why}, got {_shown(value)}")
        return found + self.relations(**context)

    def relations(self, **context) -> list[str]:
        """The problems of settings that cannot work together (subclasses say which)."""
        return []

    def validate(self, **context):
        """These settings, or one :class:`ConfigError` listing every problem."""
        found = self.problems(**context)
        if found:
            raise ConfigError("; ".join(found))
        return self

    # ------------------------------------------------------------------------- command line
    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The command line: one flag (or positional argument) per field, grouped, with its
        doc, default and choices, plus ``--config FILE``. Flags not given are absent from the
        parsed namespace, so that a ``--config`` file's values stand unless a flag overrides
        them."""
        from .cli import ArgumentParser

        p = ArgumentParser(prog=cls.PROG, description=cls.DESCRIPTION, argument_default=argparse.SUPPRESS)
        p.add_argument(
            "--config",
            metavar="FILE",
            help="YAML file of settings (e.g. a command's OUT/config.yaml); flags given with it override its values",
        )
        hints = typing.get_type_hints(cls)
        groups = {name: p.add_argument_group(name) for name in cls.GROUPS}
        for f in dataclasses.fields(cls):
            names, kwargs = _argument(f, hints[f.name])
            groups[f.metadata["group"]].add_argument(*names, **kwargs)
        return p

    @classmethod
    def parse(cls, argv: list[str] | None = None):
        """The settings of a command line: ``--config FILE``'s values (or the defaults), then
        the arguments given. Not yet validated."""
        ns = vars(cls.parser().parse_args(argv))
        path = ns.pop("config", None)
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}
        if path:
            return cls.load(path, **changes).replace(**changes)
        return cls(**changes)


def _argument(f: dataclasses.Field, hint) -> tuple[list[str], dict]:
    """``(names, keyword arguments)`` of ``add_argument`` for the field ``f`` of type ``hint``."""
    meta, base = f.metadata, _base_type(hint)
    default = "" if f.default is dataclasses.MISSING else f" (default: {_default_text(f.default)})"
    kwargs: dict[str, Any] = dict(help=meta["doc"] + default)
    if not meta["positional"]:
        kwargs["dest"] = f.name
    if base is bool:
        kwargs["action"] = "store_true"
    elif base is tuple:
        item, nargs = _tuple_item(hint), _nargs(f, hint)
        if nargs == "append":
            kwargs.update(action="append", type=item)
        elif nargs == ",":
            kwargs["type"] = lambda s: tuple(n.strip() for n in s.split(",") if n.strip())
        else:
            kwargs.update(nargs=nargs, type=item)
    else:
        kwargs["type"] = base
    choices = choices_of(f)
    if choices is not None and not (base is tuple and _nargs(f, hint) == ","):
        kwargs["choices"] = choices
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    return ([f.name] if meta["positional"] else [flag_of(f)]), kwargs


def _nargs(f: dataclasses.Field, hint) -> int | str:
    if f.metadata["nargs"] is not None:
        return f.metadata["nargs"]
    args = typing.get_args(_strip_none(hint))
    return "," if len(args) == 2 and args[1] is Ellipsis else len(args)


def _is_multi(f: dataclasses.Field) -> bool:
    """Whether the field holds several values that each must be among its choices."""
    return f.metadata["nargs"] in ("append", "+", ",")


def _tuple_item(hint) -> type:
    return typing.get_args(_strip_none(hint))[0]


def _strip_none(hint):
    if _is_union(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return _shown(value) if isinstance(value, tuple) else str(value)


def _coerce(value, hint, name: str, source: str):
    """``value`` as the field's type (lists as tuples, ints as floats); a :class:`ConfigError`
    when it cannot be."""
    optional = _is_union(hint) and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} in {source} cannot be empty")
    base = _base_type(hint)
    if base is tuple:
        item = _tuple_item(hint)
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} in {source} must be a list, got {value!r}")
        return tuple(_coerce(v, item, name, source) for v in value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{name} in {source} must be a {base.__name__}, got {value!r}")
    return value


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _base_type(hint) -> type:
    """``int`` for ``int | None``, ``tuple`` for ``tuple[float, float]``, ..."""
    hint = _strip_none(hint)
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


# ----------------------------------------------------------------------------- reference
def flag_reference(cls: type[Settings]) -> str:
    """The flag reference of ``cls`` as Markdown tables, one per group."""
    lines = []
    for group in cls.GROUPS:
        lines += [f"**{group}**", "", "| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.metadata["group"] != group:
                continue
            meta = f.metadata
            metavar = meta["metavar"]
            shown = (metavar or f.name.upper()) if meta["positional"] else flag_of(f)
            if metavar and not meta["positional"]:
                shown += " " + (" ".join(metavar) if isinstance(metavar, tuple) else metavar)
            if meta["nargs"] == "append":
                shown += " (repeat)"
            elif meta["nargs"] == "+" or meta["positional"]:
                shown += " ..."
            choices = f" ({' / '.join(map(str, choices_of(f)))})" if choices_of(f) else ""
            default = "required" if f.default is dataclasses.MISSING else _default_text(f.default)
            lines.append(f"| `{shown}` | {default} | {meta['doc']}{choices} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def reference_markers(cls: type[Settings]) -> tuple[str, str]:
    """The comments that enclose ``cls``'s generated reference in a page."""
    return (
        f"<!-- flag reference of {cls.PROG}: generated by `python -m cgc.flag_reference --write` -->",
        f"<!-- end of the flag reference of {cls.PROG} -->",
    )


def write_reference(path: str | Path, cls: type[Settings]) -> bool:
    """Replace ``cls``'s reference between its markers in ``path``; True if it changed."""
    path = Path(path)
    text = path.read_text()
    start_mark, end_mark = reference_markers(cls)
    start, end = text.index(start_mark), text.index(end_mark)
    updated = text[: start + len(start_mark)] + "\n\n" + flag_reference(cls) + "\n" + text[end:]
    if updated != text:
        path.write_text(updated)
    return updated != text
