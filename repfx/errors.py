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
