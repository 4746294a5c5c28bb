"""A small progress bar for long loops: count, rate, time left and running values.

On a terminal it redraws one line; elsewhere (CI, a log file) it prints a line about every
10 % so logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    """Wrap an iterable: ``for batch in Progress(loader, "epoch 1"): ...; bar.set(loss=0.3)``."""

    def __init__(self, iterable: Iterable[T], desc: str = "", total: int | None = None,
                 stream=None, min_interval: float = 0.25):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self.values: dict[str, float] = {}
        self.n = 0
        self._start = self._last = time.monotonic()
        self._last_decile = -1

    def set(self, **values: float) -> None:
        """Running values shown after the counts (e.g. losses)."""
        self.values.update(values)

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            frac = self.n / self.total
            filled = int(20 * frac)
            parts.append(f"{100 * frac:3.0f}% |{'#' * filled}{'.' * (20 - filled)}| {self.n}/{self.total}")
            left = (self.total - self.n) / rate if rate > 0 else 0.0
            parts.append(f"[{_fmt_time(elapsed)}<{_fmt_time(left)}, {rate:.2f} it/s]")
        else:
            parts.append(f"{self.n} [{_fmt_time(elapsed)}, {rate:.2f} it/s]")
        parts += [f"{k}={v:.4g}" for k, v in self.values.items()]
        return " ".join(parts)

    def _draw(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if final or now - self._last >= self.min_interval:
                self.stream.write("\r\033[K" + self._line() + ("\n" if final else ""))
                self.stream.flush()
                self._last = now
            return
        decile = int(10 * self.n / self.total) if self.total else -1
        if final or (self.total and decile > self._last_decile and decile < 10):
            self._last_decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def __iter__(self) -> Iterator[T]:
        self._draw()
        for item in self.iterable:
            yield item
            self.n += 1
            self._draw()
        self._draw(final=True)
