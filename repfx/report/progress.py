"""Progress of a fold on stderr, for folds that take more than a moment.

A verified fold runs in phases: capture (the model becomes a graph, shapes recorded), fold (the
passes, every rewrite proven), the verification as given, and — when a fold read a parameter —
the fold and verification of a copy with re-drawn parameters; a float64 re-check joins them
when an output misses float32's tolerance. ``repfx.fold(..., progress=None)`` (the default)
shows them as a bar (tqdm's) on stderr when stderr is a terminal, once the fold has run for
:data:`SHOW_AFTER_SECONDS`; ``progress=True`` always shows them (one plain line per phase when
stderr is not a terminal: a log keeps a readable record), ``progress=False`` never.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

SHOW_AFTER_SECONDS = 2.0


class FoldProgress:
    """The phases of one fold (see the module docstring)."""

    def __init__(self, mode: bool | None, phases: int, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._lines = mode is True and not terminal
        self._started = time.perf_counter()
        if mode is not False and terminal:
            from tqdm import tqdm  # (imported only where a bar is drawn)

            self._bar = tqdm(
                total=phases,
                desc="repfx.fold",
                unit="phase",
                file=self.stream,
                delay=0 if mode else SHOW_AFTER_SECONDS,
                bar_format="{desc}: {bar:20} {n_fmt}/{total_fmt} [{elapsed}] {postfix}",
                leave=False,
            )
        self._total, self._entered = phases, 0

    def start(self, phase: str) -> None:
        """The fold enters ``phase`` (the previous one, if any, is done)."""
        self._entered += 1
        if self._entered > self._total:  # a phase not planned (the float64 re-check)
            self.expect(self._entered)
        if self._bar is not None:
            if self._entered > 1:
                self._bar.update(1)
            self._bar.set_postfix_str(phase)
        elif self._lines:
            elapsed = time.perf_counter() - self._started
            print(f"repfx.fold: {phase} ({elapsed:.1f} s)", file=self.stream, flush=True)

    def expect(self, phases: int) -> None:
        """The fold runs ``phases`` phases in all (known once the first fold is made)."""
        self._total = phases
        if self._bar is not None and phases != self._bar.total:
            self._bar.total = phases
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            elapsed = time.perf_counter() - self._started
            print(f"repfx.fold: done ({elapsed:.1f} s)", file=self.stream, flush=True)
