"""Markdown tables, the one format every table of the project is printed and written in (the
training run's results, the evaluation report, the study): readable in a terminal, and the
same text renders in docs."""

from __future__ import annotations

from collections.abc import Sequence


def markdown(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A Markdown table of ``rows`` (cells as given, ``None`` shown as —) under ``header``;
    ``align``: one letter per column, ``l`` or ``r`` (default: the first column left, the rest
    right). Columns are padded so the text lines up in a terminal too."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError(f"every row and the alignment need {len(header)} cells")
    cells = [[str(c) for c in header]] + [["—" if c is None else str(c) for c in row] for row in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(row):
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
