"""What every command line shares: library errors become one ``error: ...`` line and a
non-zero exit status instead of a traceback."""
from __future__ import annotations

import contextlib
import sys

from .errors import CGCError, Preempted


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
        message = str(err) if not isinstance(err, OSError) or not err.filename else \
            f"{err.strerror or err}: {err.filename}"
        raise SystemExit(f"error: {message}") from None
