"""The command line's errors and how it exits: the exit codes of :mod:`repfx.cli`, the
exceptions that carry them, SIGTERM raised as :class:`Terminated`, and an error reported as one
line on stderr (and as JSON on stdout with ``--json``)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Iterator

import torch

from ..errors import CaptureError, ExampleInputError
from ..export import ExportError, ExportMismatchError
from ..sources import SourceError, SourceUsageError, UnknownModelError, UntrustedPickleError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CAPTURE = 0, 1, 2, 3
EXIT_SOURCE, EXIT_PICKLE, EXIT_EXPORT, EXIT_INTERNAL = 4, 5, 6, 7
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 128 + signal.SIGTERM


class CliError(Exception):
    """An error with its exit code; ``details`` go into the ``--json`` output."""

    def __init__(self, message: str, exit_code: int, details: dict | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.details = details or {}


class UsageError(CliError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's ``KeyboardInterrupt`` so that the same
    cleanup (``finally`` blocks: temporary files of a write in progress) runs."""


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler ``main`` installs."""
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only: Python runs
    signal handlers there); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CliError):
        return exc.exit_code
    if isinstance(exc, UntrustedPickleError):
        return EXIT_PICKLE
    if isinstance(exc, (UnknownModelError, SourceUsageError, ExampleInputError)):
        return EXIT_USAGE
    if isinstance(exc, SourceError):
        return EXIT_SOURCE
    if isinstance(exc, CaptureError):
        return EXIT_CAPTURE
    if isinstance(exc, ExportMismatchError):
        return EXIT_VERIFY
    if isinstance(exc, ExportError):
        return EXIT_EXPORT
    if _is_out_of_memory(exc):
        return EXIT_USAGE
    return EXIT_INTERNAL


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure (PyTorch's CPU allocator raises a plain ``RuntimeError``)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text
    )


def _error_message(exc: BaseException, code: int) -> str:
    """The one line printed for an error."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if code == EXIT_INTERNAL:
        return (
            f"internal error: {type(exc).__name__}: {message} (a repfx bug; rerun with "
            "--debug for the traceback and please report it)"
        )
    if _is_out_of_memory(exc) and not isinstance(exc, CliError):
        return (
            f"out of memory ({message}); the model and its example inputs do not fit in this "
            "machine's memory: pass a smaller --input-shape"
        )
    return message


def report_error(exc: Exception, args: argparse.Namespace) -> int:
    """Print ``exc`` as one line on stderr (and as JSON on stdout with ``--json``); its exit
    code."""
    code = _exit_code(exc)
    message = _error_message(exc, code)
    print(f"repfx: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        details = exc.details if isinstance(exc, CliError) else {}
        payload = {"error": message, "exit_code": code, **details}
        print(json.dumps(payload, indent=2, default=_json_default))
    elif isinstance(exc, CliError) and "report_text" in exc.details:
        print(exc.details["report_text"])
    return code


def _json_default(obj: object) -> object:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)
