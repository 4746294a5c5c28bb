"""One mechanism for every command's settings: a frozen dataclass whose fields carry their
default, a one-line doc, their flag and their check, grouped in sections.

A command's config (:class:`cgc.train_config.TrainConfig`, :class:`cgc.evaluate.EvalConfig`,
:class:`cgc.explain.ExplainConfig`) subclasses :class:`Settings` and declares each field with
:func:`setting`, or holds a section with :func:`section`: a :class:`Settings` of its own, owned
by the module that uses it (:class:`cgc.term_config.TermConfig` beside the term,
:class:`cgc.data.DataConfig` beside the datasets, ...). From that one tree come the command line
(:meth:`Settings.parser`: one flat flag per setting, with ``--config FILE``), the YAML file a
command writes and reads (:meth:`Settings.to_yaml`, :meth:`Settings.load`: one mapping per section;
a flat file of the settings' names reads too), the checks (:meth:`Settings.validate`: every
problem of the whole tree in one :class:`cgc.errors.ConfigError`, before any work) and the flag
reference in the docs (:func:`flag_reference`, written by ``python -m cgc.flag_reference``).
Setting names are unique across a tree, so a flat name (``epochs``, ``temperature``) always says
which section it belongs to: :meth:`Settings.replace` and :meth:`Settings.from_dict` take them.
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported like every other error: one ``error: ...`` line (and
    where to read the flags), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (flags: {self.prog} --help)\n")


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


def probability(v) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


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
    aliases: tuple[str, ...] = (),
):
    """A field of a :class:`Settings` class: its default, one-line doc, group (of ``--help`` and
    of the reference), flag (default ``--field-name``) and check. ``choices``: the values it
    takes, or a function giving them when asked (a registry that may grow). For tuple fields,
    ``nargs``: ``"append"`` (the flag repeated, one value each), ``"+"`` (one or more values
    after the flag), ``","`` (one comma-separated value) or a count (default: the tuple's
    length, or ``","`` for ``tuple[str, ...]``). ``positional``: given without a flag.
    ``aliases``: names it had in files written before (a flat file's ``data: ROOT`` is the data
    section's ``root`` now)."""
    meta = dict(
        doc=doc,
        group=group,
        flag=flag,
        choices=choices,
        check=check,
        metavar=metavar,
        nargs=nargs,
        positional=positional,
        aliases=aliases,
    )
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type[Settings], doc: str):
    """A field of a :class:`Settings` class that holds the section ``cls`` (default: its
    defaults); ``doc`` says what the section is about."""
    return dataclasses.field(default_factory=cls, metadata=dict(section=cls, doc=doc))


def overrides(cls: type[Settings], names: tuple[str, ...], class_name: str, group: str) -> type[Settings]:
    """A section of optional changes to ``cls``'s settings ``names``: each with the same flag,
    doc, choices and check, in ``group``, its type made optional and its default None (not given).
    How a command composes another's section whose values come from elsewhere (an evaluation
    changes only what it is told of the data a checkpoint trained on)."""
    leaves = cls.leaves()
    fields = []
    for name in names:
        _, field, owner = leaves[name]
        hint = typing.get_type_hints(owner)[name]
        meta = {**field.metadata, "group": group}
        fields.append((name, hint | None, dataclasses.field(default=None, metadata=meta)))
    return dataclasses.make_dataclass(class_name, fields, bases=(Settings,), frozen=True)


def is_section(field: dataclasses.Field) -> bool:
    return "section" in field.metadata


def choices_of(field: dataclasses.Field) -> tuple | None:
    """The values a setting takes, when they form a list (a registry's, read when asked)."""
    choices = field.metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


# ----------------------------------------------------------------------------- the base class
@dataclasses.dataclass(frozen=True)
class Settings:
    """The base of every command's settings and of their sections: the class attributes name
    the command (``PROG``), its one-line ``DESCRIPTION`` and the ``GROUPS`` of its flags, in
    order; subclasses add their cross-field checks in :meth:`relations`."""

    PROG: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    GROUPS: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------------- the tree
    @classmethod
    def leaves(cls) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, type]]:
        """``{setting name: (path of sections, field, class holding it)}`` of every setting of
        the tree, in order; a name used twice is a :class:`TypeError` (flat names must say
        where a setting lives)."""
        found: dict[str, tuple[tuple[str, ...], dataclasses.Field, type]] = {}
        for f in dataclasses.fields(cls):
            if is_section(f):
                for name, (path, leaf, owner) in f.metadata["section"].leaves().items():
                    if name in found:
                        raise TypeError(f"{cls.__name__}: the setting {name!r} is declared twice")
                    found[name] = ((f.name, *path), leaf, owner)
            else:
                if f.name in found:
                    raise TypeError(f"{cls.__name__}: the setting {f.name!r} is declared twice")
                found[f.name] = ((), f, cls)
        return found

    @classmethod
    def alias_of(cls, name: str) -> str | None:
        """The setting that had the name ``name`` before (its ``aliases``), if any."""
        return next((n for n, (_, f, _) in cls.leaves().items() if name in f.metadata.get("aliases", ())), None)

    def get(self, name: str):
        """The value of the setting ``name``, wherever in the tree it lives."""
        path, _, _ = self.leaves()[name]
        node = self
        for part in path:
            node = getattr(node, part)
        return getattr(node, name)

    def flat(self) -> dict:
        """Every setting of the tree by its name, as plain values (tuples as lists)."""
        return {name: _plain(self.get(name)) for name in self.leaves()}

    # ------------------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """Plain values (tuples as lists), one mapping per section: what the YAML files and the
        checkpoints hold."""
        return {
            f.name: getattr(self, f.name).to_dict() if is_section(f) else _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config"):
        """Settings from plain values (a YAML file, a checkpoint): a mapping per section, or the
        settings by their flat names, or both; unknown keys and values of the wrong type are a
        :class:`ConfigError` naming them."""
        changes = _routed(cls, values, source)
        return cls(**_required(cls, changes)).replace(**changes)

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

    def to_yaml(self) -> str:
        """The settings as a YAML file's text (write it with :func:`cgc.files.write_text_atomic`):
        ``--config`` on it reruns the same command."""
        import yaml

        header = f"# {self.PROG} --config THIS_FILE reruns this; flags given with it override these\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes):
        """A copy with ``changes``: settings by their flat names (wherever they live), or whole
        sections by their field names (a section or a mapping of its settings)."""
        own = {f.name: f for f in dataclasses.fields(self)}
        leaves = self.leaves()
        direct: dict = {}
        nested: dict[str, dict] = {}
        for name, value in changes.items():
            field = own.get(name)
            if field is not None and is_section(field) and not isinstance(value, (dict, Settings)):
                field, name = None, self.alias_of(name) or name  # a setting's old name, not the section
            if field is not None and is_section(field) and isinstance(value, dict):
                nested.setdefault(name, {}).update(value)
            elif field is not None:
                direct[name] = value
            elif name in leaves:
                nested.setdefault(leaves[name][0][0], {})[name] = value
            else:
                raise UnknownName("setting", name, list(dict.fromkeys([*leaves, *own])))
        for name, values in nested.items():
            direct[name] = direct.get(name, getattr(self, name)).replace(**values)
        return dataclasses.replace(self, **direct)

    # ------------------------------------------------------------------------- checks
    def problems(self, **context) -> list[str]:
        """Everything wrong with these settings, as flag-named messages (empty: they can run):
        each setting's own check, each section's problems, then :meth:`relations`
        (``context``: what the command knows of where it runs)."""
        found = []
        for f in dataclasses.fields(self):
            if is_section(f):
                found += getattr(self, f.name).problems()
            elif why := _problem(f, getattr(self, f.name)):
                found.append(why)
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
        """The command line: one flag (or positional argument) per setting of the tree, grouped,
        with its doc, default and choices, plus ``--config FILE``. Flags not given are absent
        from the parsed namespace, so that a ``--config`` file's values stand unless a flag
        overrides them."""
        p = ArgumentParser(prog=cls.PROG, description=cls.DESCRIPTION, argument_default=argparse.SUPPRESS)
        p.add_argument(
            "--config",
            metavar="FILE",
            help="YAML file of settings (e.g. a command's OUT/config.yaml); flags given with it override its values",
        )
        groups = {name: p.add_argument_group(name) for name in cls.GROUPS}
        for _, f, owner in cls.leaves().values():
            names, kwargs = _argument(f, typing.get_type_hints(owner)[f.name])
            groups[f.metadata["group"]].add_argument(*names, **kwargs)
        return p

    @classmethod
    def parse(cls, argv: list[str] | None = None):
        """The settings of a command line: ``--config FILE``'s values (or the defaults), then
        the arguments given. Not yet validated."""
        ns = vars(cls.parser().parse_args(argv))
        path = ns.pop("config", None)
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}
        base = cls.load(path, **_required(cls, changes)) if path else cls(**_required(cls, changes))
        return base.replace(**changes)


def _required(cls: type[Settings], changes: dict) -> dict:
    """The values in ``changes`` of ``cls``'s own settings that have no default (positional
    arguments): the ones its constructor needs."""
    return {
        f.name: changes[f.name]
        for f in dataclasses.fields(cls)
        if f.name in changes and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def _routed(cls: type[Settings], values: dict, source: str) -> dict:
    """``values`` (sections as mappings, or flat setting names) checked against ``cls``'s tree
    and coerced to each setting's type, as :meth:`Settings.replace` changes."""
    own = {f.name: f for f in dataclasses.fields(cls)}
    leaves = cls.leaves()
    changes: dict = {}
    for key, value in values.items():
        field = own.get(key)
        if field is not None and is_section(field) and not isinstance(value, dict) and cls.alias_of(key):
            field, key = None, cls.alias_of(key)  # a setting's old name in a flat file, not the section
        elif key not in leaves and key not in own and cls.alias_of(key):
            key = cls.alias_of(key)
        if field is not None and is_section(field):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} in {source} must be a mapping of settings, got {value!r}")
            sub = field.metadata["section"]
            changes.setdefault(key, {}).update(_routed(sub, value, f"{source} ({key})"))
        elif key in leaves:
            _, _, owner = leaves[key]
            changes[key] = _coerce(value, typing.get_type_hints(owner)[key], key, source)
        else:
            raise UnknownName("setting", key, list(dict.fromkeys([*leaves, *own])), hint=f"in {source}")
    return changes


def _problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with one setting's value on its own (None: nothing)."""
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag_of(f)} must be a finite number, got {value}"
    choices = choices_of(f)
    values = value if _is_multi(f) and value is not None else (value,)
    wrong = [v for v in values if choices is not None and v not in choices and v is not None]
    if wrong and callable(meta["choices"]):  # a registry: suggest the closest names
        return str(UnknownName(flag_of(f), wrong[0], choices))
    if wrong:
        return f"{flag_of(f)} must be one of {', '.join(map(str, choices))}, got {wrong[0]!r}"
    if meta["check"] is not None and (why := meta["check"](value)):
        return f"{flag_of(f)} {why}, got {_shown(value)}"
    return None


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
    return " ".join(map(_number, value)) if isinstance(value, (tuple, list)) else repr(value)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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
        for _, f, _ in cls.leaves().values():
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
        f"<!-- flag reference of {cls.PROG}: generated from its settings, not edited by hand -->",
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
