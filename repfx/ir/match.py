"""One type for "no": why a pattern does not match or a check does not hold.

The convention every op view, pattern and check of repfx follows:

* a *pattern* or *view* returns the matched value, ``None`` when the node is simply not a
  candidate (nothing to explain), or ``Fail(reason)`` when it is a candidate that does not hold
  (a training-mode dropout, a batch norm without running statistics);
* a *check* returns ``Fail | None``: ``None`` when it holds, else why it does not.

A rule turns a :class:`Fail` into ``Skipped(rule, where, fail.reason)`` for the report. A
``Fail`` is returned, never raised, and has no truth value of its own: callers test
``isinstance(x, Fail)`` (or ``x is not None`` for a check), never ``if x``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fail:
    """Why a pattern does not match or a check does not hold: returned, never raised."""

    reason: str
