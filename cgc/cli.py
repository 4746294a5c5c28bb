"""What every command line shares: logging to the terminal, library errors as one ``error: ...``
line and a non-zero exit status instead of a traceback, and running a command in one process or
as one of torchrun's."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

from . import distributed
from .errors import CGCError, Preempted
from .runtime import deterministic


@contextlib.contextmanager
def exit_on_error():
    """Run a command's body; a :class:`cgc.errors.CGCError` (and the file errors a user causes)
    ends the process with ``error: <message>`` on stderr and exit status 1; a preempted run
    with ``preempted: <where its checkpoint is>`` and status 143."""
    try:
        yield
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        raise SystemExit(Preempted.exit_code) from None
    except (CGCError, FileNotFoundError, PermissionError, IsADirectoryError) as err:
        message = (
            str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror or err}: {err.filename}"
        )
        raise SystemExit(f"error: {message}") from None


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes (a redirected or
    captured stderr too)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Show the library's ``cgc.*`` log records on stderr, one message per line (once per
    process; a caller that configured the ``cgc`` logger itself keeps its handlers)."""
    logger = logging.getLogger("cgc")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def run_in_job(command: Callable[[distributed.Context], dict], device: str, *, strict: bool = False) -> dict:
    """``command(ctx)`` in this process's place of the job (torchrun's process group, or one
    process), the group left afterwards; ``strict`` runs it under
    ``torch.use_deterministic_algorithms`` (:func:`cgc.runtime.deterministic`)."""
    with deterministic(strict):
        ctx = distributed.init(device)
        try:
            return command(ctx)
        finally:
            distributed.shutdown(ctx)
