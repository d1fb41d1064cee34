"""``repfx`` command line: ``repfx optimize NAME`` folds a built-in model and prints the report.

This is the first slice of the CLI: built-in model names only (``repfx models`` lists them).
Exit codes: 0 success, 1 verification failed, 2 bad usage (unknown model, bad shape, refused
output path), 3 the model could not be captured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import models
from .capture import CaptureError, ExampleInputError
from .fold import VerificationError, fold

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CAPTURE = 0, 1, 2, 3
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


class UsageError(Exception):
    pass


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: every dimension must be positive")
    return shape


def _save_atomically(module: torch.nn.Module, out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
    os.close(fd)
    try:
        torch.save(module, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _optimize(args: argparse.Namespace) -> int:
    try:
        model = models.create(args.source).eval()
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    shape = _parse_shape(args.input_shape) if args.input_shape else DEFAULT_INPUT_SHAPE
    example = None if args.no_verify else (torch.randn(shape),)
    print(f"folding {args.source} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    folded = fold(model, example, verify=not args.no_verify)
    report = folded.meta["repfx_report"]
    print(report)
    print(f"  time        {time.perf_counter() - start:.1f} s")
    if args.explain:
        print(report.explain() or "(every candidate was folded)")
    if args.output:
        _save_atomically(folded, Path(args.output), args.force)
        print(f"wrote {args.output}")
    return EXIT_OK


def _list_models(_: argparse.Namespace) -> int:
    print("\n".join(models.names()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repfx", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="fold a built-in model and print the report")
    opt.add_argument("source", help="a built-in model name (see `repfx models`)")
    opt.add_argument("-o", "--output", help="write the folded GraphModule here (torch.save)")
    opt.add_argument("--force", action="store_true", help="overwrite an existing output")
    opt.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    opt.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    opt.add_argument("--explain", action="store_true", help="list every candidate not folded")
    opt.set_defaults(run=_optimize)
    sub.add_parser("models", help="list built-in models").set_defaults(run=_list_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ExampleInputError) as exc:
        if args.debug:
            raise
        print(f"repfx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as exc:
        if args.debug:
            raise
        print(f"repfx: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except CaptureError as exc:
        if args.debug:
            raise
        print(f"repfx: error: {exc}", file=sys.stderr)
        return EXIT_CAPTURE


if __name__ == "__main__":
    sys.exit(main())
