"""The ``optimize`` command: load SOURCE, fold and verify it, draw, write, benchmark, print the
report; and the ``models`` command (also ``--list``)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .. import __version__, models
from ..errors import ExampleInputError
from ..fold import VerificationError, fold
from ..report.draw import DrawError
from ..report.fold_report import FoldReport
from ..sources import LoadedModel, load_source
from .errors import EXIT_OK, EXIT_VERIFY, CliError, UsageError
from .example_inputs import (
    check_input_count,
    make_example_inputs,
    model_dtype,
    parse_shape,
    shapes_text,
)
from .outputs import Target, check_output_path, check_picture_path, output_format, write_output
from .progress import Progress, timed
from .text import human_report

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def list_models(_: argparse.Namespace) -> int:
    print("\n".join(models.names()))
    print(
        "(also: timm:NAME for timm's models, package.module:factory for your own code, or a "
        "state-dict file with --arch)",
        file=sys.stderr,
    )
    return EXIT_OK


def run_optimize(args: argparse.Namespace) -> int:
    if args.list:
        return list_models(args)
    if args.source is None:
        raise UsageError("optimize needs a SOURCE: a model name, timm:NAME, module:factory or file")
    progress = Progress(args.quiet or False)
    options = _checked_options(args)
    result: dict = {"repfx": __version__, "source": args.source}
    started = time.perf_counter()

    loaded, model, seconds = _load_model(args, progress)
    result["load_seconds"] = seconds
    _check_graph_block(args.graph_block, model, loaded.description)
    dtype = model_dtype(model)
    shapes = _input_shapes(args, options, loaded, model)
    inputs = make_example_inputs(shapes, dtype) if shapes else None
    result.update(
        kind=loaded.kind,
        model=loaded.description,
        input_shapes=[list(s) for s in shapes],
        dtype=str(dtype).removeprefix("torch."),
    )

    folded, seconds = _fold_verified(model, inputs, shapes, loaded.description, args, progress)
    report: FoldReport = folded.meta["repfx_report"]
    result["fold_seconds"] = seconds
    result.update(report.to_dict())

    if options.picture is not None:
        result["graph"] = _draw(report, options.picture, args.graph_block, progress)
    if options.out is not None:
        target = Target(
            options.out, options.fmt, force=args.force, static_shapes=args.static_shapes
        )
        result["output"] = write_output(folded, model, inputs, target, not args.no_verify, progress)
    if args.benchmark:
        progress(f"benchmarking eager latency ({args.benchmark_rounds} interleaved rounds) ...")
        result["benchmark"] = benchmark(model, folded, inputs, args.benchmark_rounds)
    progress.finish()
    result["seconds"] = time.perf_counter() - started
    _print_result(args, report, result)
    return EXIT_OK


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    """``optimize``'s options that are checked before any slow work."""

    fmt: str | None  # OUT's format; None without OUT
    out: Path | None  # OUT, if given (it may be written)
    picture: Path | None  # --graph's file, if given (it may be written)
    shapes: list[tuple[int, ...]]  # --input-shape, as given


def _checked_options(args: argparse.Namespace) -> OptimizeOptions:
    """Check the options, in this order, before any slow work: the first wrong one is a
    usage error."""
    fmt = output_format(args)
    out = check_output_path(args)
    picture = check_picture_path(args)
    shapes = [parse_shape(s) for s in args.input_shape or []]
    if args.benchmark_rounds < 1:
        raise UsageError("--benchmark-rounds must be at least 1")
    return OptimizeOptions(fmt, out, picture, shapes)


def _load_model(
    args: argparse.Namespace, progress: Progress
) -> tuple[LoadedModel, nn.Module, float]:
    """SOURCE loaded; its model in eval mode, cast to ``--dtype``; and the seconds it took."""
    loaded, seconds = timed(
        progress,
        f"loading {args.source}",
        lambda: load_source(
            args.source, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle
        ),
    )
    model = loaded.model.eval()
    if args.dtype:
        model = model.to(DTYPES[args.dtype])
    return loaded, model, seconds


def _check_graph_block(block: str | None, model: nn.Module, description: str) -> None:
    """``--graph-block`` names a module of the model (checked before folding)."""
    if not block:
        return
    names = [name for name, _ in model.named_modules() if name]
    if block not in names:
        close = difflib.get_close_matches(block, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UsageError(f"--graph-block {block}: {description} has no module of that name{hint}")


def _input_shapes(
    args: argparse.Namespace, options: OptimizeOptions, loaded: LoadedModel, model: nn.Module
) -> list[tuple[int, ...]]:
    """The example inputs' shapes: ``--input-shape``, else the model's default, if any. A usage
    error when there is none but the run needs inputs, or when they do not fit ``forward``."""
    shapes = options.shapes
    if not shapes and loaded.default_input_shape:
        shapes = [loaded.default_input_shape]
    why = _why_inputs_are_needed(args, options.fmt)
    if not shapes and why is not None:
        raise UsageError(
            f"cannot infer the input shape of {loaded.description}; pass --input-shape "
            f"(e.g. --input-shape 1,3,224,224), which is needed {why}"
        )
    if shapes:
        check_input_count(model, shapes, loaded.description)
    return shapes


def _why_inputs_are_needed(args: argparse.Namespace, fmt: str | None) -> str | None:
    """Why the run needs example inputs (to verify, to benchmark, to export ``.pt2`` /
    ``.onnx``); ``None`` when it does not."""
    if not args.no_verify:
        return "to verify the fold"
    if args.benchmark:
        return "for --benchmark"
    if fmt in ("pt2", "onnx"):
        return f"for {fmt}"
    return None


def _fold_verified(
    model: nn.Module,
    inputs: tuple | None,
    shapes: list[tuple[int, ...]],
    description: str,
    args: argparse.Namespace,
    progress: Progress,
) -> tuple[nn.Module, float]:
    """The folded model (verified on ``inputs`` unless ``--no-verify``) and the seconds it
    took; wrong inputs are a usage error, a failed verification exits with ``EXIT_VERIFY``."""
    verify = not args.no_verify
    shape_text = " and ".join("×".join(map(str, s)) for s in shapes) or "no example input"
    step = "tracing and folding" + (f", verifying on {shape_text}" if verify else "")
    try:
        return timed(
            progress,
            step,
            lambda: fold(
                model,
                inputs,
                verify=verify,
                capture=args.capture,
                fold_norm_affine=args.fold_norm_affine,
                progress=False if args.quiet else None,
            ),
        )
    except ExampleInputError as exc:
        given = shapes_text(shapes)
        raise UsageError(f"wrong --input-shape {given} for {description}: {exc}") from exc
    except VerificationError as exc:
        failed = exc.report.failed_verification()
        raise CliError(
            f"verification failed: the folded model differs from the original "
            f"({failed.summary()}); nothing written. This is a repfx bug unless the model is "
            "non-deterministic; --explain / --json show the report, --no-verify skips the check",
            EXIT_VERIFY,
            {"report": exc.report.to_dict(), "report_text": str(exc.report)},
        ) from exc


def _print_result(args: argparse.Namespace, report: FoldReport, result: dict) -> None:
    """The run's report on stdout: one JSON object with ``--json``, else text."""
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(human_report(report, result, explain=args.explain, everything=args.all))


def _draw(report: FoldReport, path: Path, block: str | None, progress: Progress) -> dict:
    """Draw one folded block (``--graph-block``, else the report's choice) before and after
    into ``path`` (``--graph``). A block that cannot be drawn is a usage error when the user
    named it, and a line of the report when repfx chose it (a model with nothing folded)."""
    progress(f"drawing {block or 'a folded block'} into {path} ...")
    try:
        drawn = report.draw(path, block=block)
    except DrawError as exc:
        if block is not None or "matplotlib" in str(exc):
            raise UsageError(f"--graph: {exc}") from exc
        return {"path": None, "why": str(exc)}
    except OSError as exc:
        raise UsageError(f"--graph {path}: cannot write it: {exc.strerror or exc}") from exc
    return {"path": str(path), "block": drawn}


def benchmark(
    original: nn.Module, folded: nn.Module, inputs: tuple, rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Eager latency of both models, interleaved: each round times one forward of each,
    alternating which goes first, so slow phases of a shared machine hit both alike."""
    times: dict[str, list[float]] = {"before": [], "after": []}
    models_ = {"before": original, "after": folded}
    with torch.inference_mode():
        for _ in range(warmup):
            original(*inputs)
            folded(*inputs)
        for i in range(rounds):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                start = time.perf_counter()
                models_[name](*inputs)
                times[name].append(time.perf_counter() - start)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    paired = statistics.median(a / b for a, b in zip(times["after"], times["before"], strict=True))
    return {
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "before_ms": before * 1e3,
        "after_ms": after * 1e3,
        "speedup": before / after,
        "paired_ratio_median": paired,
    }
