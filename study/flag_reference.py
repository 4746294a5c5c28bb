"""``python -m study.flag_reference``: the study's flag reference in docs/study.md, generated from
:class:`study.plan.StudyConfig` as ``python -m cgc.flag_reference`` generates the library's
(same flags: ``--write``, ``--check``)."""

from __future__ import annotations

from cgc import flag_reference

from .plan import StudyConfig

PAGES = {StudyConfig: "docs/study.md"}

if __name__ == "__main__":
    flag_reference.main(pages=PAGES)
