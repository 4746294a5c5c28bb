"""Typed errors of the library, each with a message a user can act on.

Library code raises these (or the built-in exception they subclass, so ``except ValueError``
keeps working); only a command line's ``main`` turns them into a one-line ``error: ...`` exit
(:func:`cgc.cli.exit_on_error`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CGCError(Exception):
    """Base of every error the command lines report as one line."""


class UnknownName(CGCError, ValueError):
    """A name (architecture, CAM method, layer, metric, dataset) that is not among the known
    ones; the message suggests the closest known names."""

    def __init__(self, kind: str, name: str, known: Iterable[str], *, hint: str = ""):
        known = list(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
        elif len(known) <= 12:
            msg += f"; choose one of {', '.join(known)}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known


class ConfigError(CGCError, ValueError):
    """Settings or inputs that cannot work together (the message says which and why)."""


class UnsupportedModel(CGCError, ValueError):
    """A model cgc cannot explain or train as asked: no classifier head, no convolutional layer
    with a spatial output, weights that do not fit it."""


class BadFile(CGCError, ValueError):
    """A file that exists but cannot be used: corrupt, truncated, refused by
    ``torch.load(weights_only=True)``, or holding something other than what was asked for."""


class MissingFile(CGCError, FileNotFoundError):
    """A file or folder that was asked for and is not there."""


class MissingDependency(CGCError, ImportError):
    """An optional package that a requested feature needs (``timm``, ``tensorboard``, ...)."""

    def __init__(self, package: str, feature: str):
        super().__init__(f"{feature} needs the optional package {package!r}: pip install {package}")
        self.package = package


class TrainingFailed(CGCError, RuntimeError):
    """A run that cannot go on (a non-finite loss, no readable batch); the message says what
    was saved and what to change."""


class Preempted(CGCError):
    """The run was asked to stop (SIGTERM, as SLURM preempts) and saved a checkpoint to resume
    from; the command line exits with status 143 (128 + SIGTERM) so schedulers and torchrun see
    an unfinished job."""

    exit_code = 143
