"""``repfx`` command line: fold a model and write a deployable, checked file.

``repfx optimize SOURCE [-o OUT] [options]`` loads SOURCE (a built-in model name, ``timm:NAME``,
``package.module:factory``, or a file — see :mod:`repfx.sources`), folds it with
:func:`repfx.fold`, verifies the result on example inputs, prints a report and writes OUT as
``.pt`` (``torch.save``), ``.pt2`` (``torch.export``) or ``.onnx``. ``repfx models`` (or
``--list``) lists the built-in models.

Exit codes:

==  =====================================================================================
0   success
1   verification failed: the folded model, or the file written, differs from the original
    beyond ``repfx.proof.tolerances``; nothing was written
2   usage: bad option, unknown model name, wrong ``--input-shape`` (not integers, too large
    to allocate, not one per input of ``forward``, or the model does not run on it), OUT
    exists without ``--force``, OUT is SOURCE, OUT cannot be written (its directory is
    missing or read-only, or OUT is a directory, device or other non-regular file), a state
    dict without ``--arch``
3   the model cannot be traced with torch.fx
4   SOURCE cannot be read: missing file, unreadable or corrupt file, weights that do not fit
    ``--arch``, a factory that cannot be imported or fails
5   refused: SOURCE is a pickled Python object and ``--trust-pickle`` was not given
6   export failed: ``torch.export`` / ``torch.onnx.export`` / ``onnx.checker`` /
    onnxruntime could not export or run the model
7   internal error (a repfx bug: please report it; ``--debug`` shows the traceback)
==  =====================================================================================

Errors are one line on stderr, without a traceback unless ``--debug`` (which prints it as well
and keeps the exit code); progress messages for slow steps go to stderr too (``--quiet``
silences them), so stdout holds only the report (``--json``: one JSON object, also on
failure). Ctrl-C exits with 130 and SIGTERM with 143, both after removing the temporary files
of a write in progress.

Output safety: OUT is written into a temporary directory next to it and renamed into place
after its checks. It replaces only a regular file or a symbolic link (the link itself, never
its target), and only with ``--force``; so do companion files (ONNX's ``OUT.onnx.data``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .. import __version__
from .errors import (
    EXIT_CAPTURE,
    EXIT_EXPORT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PICKLE,
    EXIT_SOURCE,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_VERIFY,
    CliError,
    Terminated,
    UsageError,
    raise_terminated,
    report_error,
    sigterm_as_interrupt,
)
from .example_inputs import parse_shape
from .optimize import DTYPES, benchmark, list_models, run_optimize
from .outputs import FORMAT_LOADERS, PICTURE_SUFFIXES_TEXT, check_output_path

__all__ = [
    "EXIT_CAPTURE",
    "EXIT_EXPORT",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PICKLE",
    "EXIT_SOURCE",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "EXIT_VERIFY",
    "CliError",
    "Terminated",
    "UsageError",
    "benchmark",
    "build_parser",
    "check_output_path",
    "main",
    "parse_shape",
    "raise_terminated",
    "sigterm_as_interrupt",
]


_LIST_HELP = "list built-in models and exit"  # --list, before or after the command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repfx",
        description="repfx command line: fold a model and write a deployable, checked file.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage, 3 untraceable model, "
        "4 unreadable SOURCE, 5 refused pickle, 6 export failed, 7 internal error",
    )
    parser.add_argument("--version", action="version", version=f"repfx {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--list", action="store_true", help=_LIST_HELP)
    sub = parser.add_subparsers(dest="command")
    opt = sub.add_parser(
        "optimize",
        help="fold a model, print the report, write OUT",
        description="Fold SOURCE, verify it, print the report and (with -o) write OUT.",
    )
    _add_optimize_arguments(opt)
    opt.set_defaults(run=run_optimize)
    sub.add_parser("models", help="list built-in models").set_defaults(run=list_models)
    return parser


def _add_optimize_arguments(opt: argparse.ArgumentParser) -> None:
    """``optimize``'s arguments, in the order ``--help`` lists them."""

    def switch(name: str, help_text: str) -> None:
        opt.add_argument(name, action="store_true", help=help_text)

    opt.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="a built-in model name (see `repfx models`), timm:NAME, package.module:factory, "
        "or a file: a state dict (.pt/.pth/.safetensors, with --arch) or a pickled module "
        "(with --trust-pickle)",
    )
    opt.add_argument("-o", "--output", metavar="OUT", help="write the folded model here")
    opt.add_argument(
        "--format",
        choices=sorted(FORMAT_LOADERS),
        help="output format (default: from OUT's suffix: .pt, .pt2, .onnx)",
    )
    switch("--force", "overwrite an existing OUT")
    switch(
        "--static-shapes",
        "fix the example inputs' shapes in a .pt2 / .onnx OUT (default: dynamic batch)",
    )
    opt.add_argument(
        "--arch", help="the model a state-dict SOURCE is loaded into (name, timm:NAME, module:fn)"
    )
    opt.add_argument("--weights", metavar="FILE", help="state dict to load into a named model")
    switch(
        "--trust-pickle",
        "allow SOURCE to be a pickled module (loading it runs code from the file)",
    )
    opt.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE",
        help="example input shape, e.g. 1,3,224,224 or 1x3x224x224; repeat for several inputs "
        "(default: inferred for built-in and timm models)",
    )
    opt.add_argument("--dtype", choices=sorted(DTYPES), help="convert the model to this dtype")
    opt.add_argument(
        "--capture",
        choices=("auto", "fx", "export"),
        default="auto",
        help="front end: torch.fx, torch.export, or auto (torch.fx, then torch.export where "
        "torch.fx cannot trace; default)",
    )
    opt.add_argument(
        "--graph",
        metavar="PICTURE",
        help=f"draw one folded block before and after into PICTURE ({PICTURE_SUFFIXES_TEXT}; "
        "needs matplotlib: pip install 'repfx[draw]')",
    )
    opt.add_argument(
        "--graph-block",
        metavar="NAME",
        help="with --graph: the module to draw, by its path (e.g. stages.0.0; default: a "
        "block of the most common kind among those a fold changed, the one whose fold removed "
        "the most ops)",
    )
    switch(
        "--fold-norm-affine",
        "also move each norm's own weight and bias into the linears / convs that read it "
        "(affine-free norms, as rotation-based quantization wants; linears may gain a bias)",
    )
    switch("--no-verify", "skip the equivalence checks")
    switch(
        "--explain",
        "list the candidates not folded that you could change (with --all: every one)",
    )
    switch("--all", "with --explain: every candidate not folded")
    switch("--json", "print the report as JSON on stdout")
    switch("--benchmark", "time eager inference before -> after")
    opt.add_argument(
        "--benchmark-rounds",
        type=int,
        default=30,
        metavar="N",
        help="with --benchmark: interleaved timing rounds of each model (default: 30)",
    )
    opt.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    opt.add_argument(  # also accepted after the command; SUPPRESS keeps a leading --debug
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    switch("--list", _LIST_HELP)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if args.list:
            return list_models(args)
        parser.print_usage(sys.stderr)
        print("repfx: error: choose a command: optimize or models", file=sys.stderr)
        return EXIT_USAGE
    try:
        with sigterm_as_interrupt():
            return args.run(args)
    except Terminated:  # SIGTERM: the `finally` blocks removed temporary files, as on Ctrl-C
        print("repfx: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("repfx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`repfx ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.debug:  # the traceback too; the exit code stays the error's
            traceback.print_exc()
        return report_error(exc, args)
