"""The root of repfx's exceptions: ``except repfx.Error`` catches every error repfx raises on
purpose — a model it cannot capture, inputs the model does not run on, a fold that does not
verify, an export that fails, a source the CLI cannot load — and nothing else.

Each subclass also derives from the built-in exception it refines (``CaptureError`` is a
``RuntimeError``, ``VerificationError`` an ``AssertionError``, ...), so code written against
those keeps working.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every exception repfx raises on purpose."""


class TrainingModeError(Error, ValueError):
    """``fold(..., strict=True)`` of a model in training mode: BatchNorm and dropout in
    training mode compute batch statistics / random masks, which no fold can keep."""


class CaptureError(Error, RuntimeError):
    """The model could not be captured; the message says why and what to do."""


class ExampleInputError(Error, ValueError):
    """The model does not run on the example inputs it was given."""


class GuardError(Error, AssertionError):
    """The folded module was called with inputs outside what the fold assumed (a size the
    capture fixed to the example inputs'); the message names the input and what to do."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut to ``limit`` characters), or ``Type`` when the
    message is empty: how repfx quotes an exception inside its own messages."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    first = lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}"
