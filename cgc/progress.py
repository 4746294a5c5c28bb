"""Progress bars from ``tqdm``: a live bar on a terminal, and in logs (CI, a file, a SLURM job)
one short line about every 10 % instead of carriage-return redraws."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _Lines:
    """A stream that writes each of tqdm's redraws (``\\r`` + bar) as one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable, desc: str = "", *, total: int | None = None, initial: int = 0, disable: bool = False,
             stream=None) -> tqdm:
    """``tqdm`` over ``iterable`` on ``stream`` (stderr); ``bar.set_postfix(loss=...)`` shows
    running values. Not on a terminal, it prints a line at the start, about every 10 % and at
    the end."""
    stream = stream or sys.stderr
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, file=stream,
                    dynamic_ncols=True)
    every = max(1, (total or 10) // 10)
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, file=_Lines(stream),
                mininterval=0, miniters=every, ncols=100, ascii=True)
