"""Progress bars from ``tqdm``, shown only when the application asked for the library's INFO
log records (:func:`cgc.cli.setup_logging` does for the command lines): a live bar when the
``cgc`` logger writes to a terminal, else one short log line about every 10 % (CI, a file, a
SLURM job, a study's per-run log) instead of carriage-return redraws."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

log = logging.getLogger("cgc.progress")


class _Lines:
    """A stream that turns each of tqdm's redraws (``\\r`` + bar) into one log record."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            log.info(line)

    def flush(self) -> None:
        pass


def _terminal():
    """The stream of a handler of the ``cgc`` loggers that writes to a terminal, or None."""
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and getattr(stream, "isatty", lambda: False)():
                return stream
        logger = logger.parent if logger.propagate else None
    return None


def progress(iterable, desc: str = "", *, total: int | None = None, initial: int = 0, disable: bool = False) -> tqdm:
    """``tqdm`` over ``iterable``; ``bar.set_postfix(loss=...)`` shows running values."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    if disable or not log.isEnabledFor(logging.INFO):
        return tqdm(iterable, total=total, initial=initial, disable=True)
    stream = _terminal()
    if stream is not None:
        return tqdm(iterable, desc=desc, total=total, initial=initial, file=stream, dynamic_ncols=True)
    every = max(1, (total or 10) // 10)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        initial=initial,
        file=_Lines(),
        mininterval=0,
        miniters=every,
        ncols=100,
        ascii=True,
    )
