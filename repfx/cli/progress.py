"""Progress messages on stderr for the slow steps of a run (``--quiet`` silences them)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """A line on stderr when a slow step starts (``repfx: loading x ...``), and one with its
    duration when it ends — at the next step, or at :meth:`finish`."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._open: tuple[str, float] | None = None

    def __call__(self, message: str) -> None:
        self.finish()
        self._open = (message.removesuffix(" ..."), time.perf_counter())
        self._print(message)

    def finish(self) -> None:
        """Report the duration of the step in progress, if any."""
        if self._open is not None:
            step, started = self._open
            self._open = None
            self._print(f"{step}: {time.perf_counter() - started:.1f} s")

    def _print(self, line: str) -> None:
        if not self.quiet:
            print(f"repfx: {line}", file=sys.stderr, flush=True)


def timed(progress: Progress, message: str, step: Callable[[], object]) -> tuple[object, float]:
    progress(f"{message} ...")
    start = time.perf_counter()
    result = step()
    return result, time.perf_counter() - start
