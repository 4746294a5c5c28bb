"""``python -m cgc.flag_reference``: the flag references in the docs, generated from the commands'
settings (:mod:`cgc.settings`).

Each command's reference lives in one page, between two markers that name the command
(:func:`cgc.settings.reference_markers`); ``--write`` updates every page, ``--check`` fails
when one is stale (the tests run it), and with neither the references are printed.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import ClassVar

from . import cli
from .errors import ConfigError
from .evaluate import EvalConfig
from .explain import ExplainConfig
from .settings import Settings, flag_reference, reference_markers, setting, write_reference
from .train_config import TrainConfig

#: each command's settings and the page (relative to the repository) that holds its reference
PAGES: dict[type[Settings], str] = {
    TrainConfig: "docs/training.md",
    EvalConfig: "docs/evaluation.md",
    ExplainConfig: "docs/evaluation.md",
}


def stale(root: Path, pages: dict[type[Settings], str] = PAGES) -> list[str]:
    """The ``pages`` under ``root`` whose reference differs from the settings (or lacks markers)."""
    found = []
    for cls, page in pages.items():
        text = (root / page).read_text()
        start, end = reference_markers(cls)
        if text.count(start) != 1 or text.count(end) != 1:
            found.append(f"{page}: needs the markers {start!r} and {end!r} once each")
            continue
        written = text[text.index(start) + len(start) : text.index(end)]
        if written != "\n\n" + flag_reference(cls) + "\n":
            found.append(f"{page}: the reference of {cls.PROG} is stale")
    return found


@dataclasses.dataclass(frozen=True)
class ReferenceConfig(Settings):
    """What ``python -m cgc.flag_reference`` does (its flags)."""

    PROG: ClassVar[str] = "python -m cgc.flag_reference"
    DESCRIPTION: ClassVar[str] = "Print the flag references, write them into the docs, or check that they are current."
    GROUPS: ClassVar[tuple[str, ...]] = ("reference",)

    root: str = setting(".", "the repository", "reference", metavar="DIR")
    write: bool = setting(False, "update every page's references", "reference")
    check: bool = setting(False, "exit 1 naming the stale references", "reference")

    def relations(self) -> list[str]:
        return ["give --write or --check, not both"] if self.write and self.check else []


def main(argv=None, pages: dict[type[Settings], str] = PAGES) -> None:
    """``python -m cgc.flag_reference``: see :class:`ReferenceConfig` (``pages``: the settings
    and their pages; the study beside the library passes its own)."""
    with cli.exit_on_error():
        config = ReferenceConfig.parse(argv).validate()
        root = Path(config.root)
        if config.write:
            for cls, page in pages.items():
                changed = write_reference(root / page, cls)
                print(f"{page} ({cls.PROG}): {'updated' if changed else 'already up to date'}", file=sys.stderr)
        elif config.check:
            found = stale(root, pages)
            if found:
                raise ConfigError("; ".join(found) + "; run `python -m cgc.flag_reference --write`")
        else:
            for cls in pages:
                print(f"## {cls.PROG}\n\n{flag_reference(cls)}")


if __name__ == "__main__":
    main()
