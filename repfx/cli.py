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
    beyond ``repfx.tolerances``; nothing was written
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
import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import stat
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from . import __version__, models
from .capture import CaptureError, ExampleInputError
from .draw import DrawError
from .export import (
    ExportError,
    ExportMismatchError,
    OutputExistsError,
    OutputNotAFileError,
    export_onnx,
    onnx_op_counts_of,
    save_pt,
    save_pt2,
)
from .fold import VerificationError, fold
from .report import FoldReport
from .sources import (
    LoadedModel,
    SourceError,
    SourceUsageError,
    UnknownModelError,
    UntrustedPickleError,
    is_file_source,
    load_source,
)

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CAPTURE = 0, 1, 2, 3
EXIT_SOURCE, EXIT_PICKLE, EXIT_EXPORT, EXIT_INTERNAL = 4, 5, 6, 7
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 128 + signal.SIGTERM
MAX_INDEX = 2**63 - 1  # torch sizes are int64

FORMATS = {".pt": "pt", ".pth": "pt", ".pt2": "pt2", ".onnx": "onnx"}
FORMAT_LOADERS = {
    "pt": "torch.load(path, weights_only=False)",
    "pt2": "torch.export.load(path).module()",
    "onnx": "onnxruntime.InferenceSession(path)",
}
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: every dimension must be positive")
    if math.prod(shape) > MAX_INDEX:
        raise UsageError(
            f"--input-shape {text!r}: the input is too large ({math.prod(shape):.3g} elements; "
            "PyTorch tensors hold at most 2**63 - 1)"
        )
    return shape


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    """The shapes as they were given: ``1,3,32,32 1,3,32,32``."""
    return " ".join(",".join(map(str, s)) for s in shapes)


def _output_format(args: argparse.Namespace) -> str | None:
    if args.output is None:
        if args.format:
            raise UsageError("--format needs an output file: -o OUT")
        return None
    suffix = Path(args.output).suffix.lower()
    fmt = args.format or FORMATS.get(suffix)
    if fmt is None:
        raise UsageError(
            f"cannot tell the format of {args.output!r} from its suffix; use .pt, .pt2 or "
            ".onnx, or pass --format pt|pt2|onnx"
        )
    return fmt


def _check_output_path(args: argparse.Namespace) -> Path | None:
    """OUT, if it may be written (see :func:`_writable_target`)."""
    return None if args.output is None else _writable_target(Path(args.output), "-o", args)


def _writable_target(out: Path, flag: str, args: argparse.Namespace) -> Path:
    """``out`` (given as ``flag``), if it may be written: not SOURCE, absent or a regular file
    or symbolic link (replaced, not followed) with ``--force``, in a directory repfx can write
    into."""
    sources = [args.source] if is_file_source(args.source) else []
    sources += [args.weights] if args.weights else []
    for source in sources:
        if os.path.realpath(out) == os.path.realpath(source):  # realpath: no error on loops
            raise UsageError(
                f"{flag} {out} is the model file being read; repfx never overwrites it"
            )
    mode = _lstat_mode(out)
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise UsageError(f"{flag} {out} is a directory; name the file to write")
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UsageError(
                f"{flag} {out} is not a regular file (a device, pipe or socket); repfx only "
                "writes regular files"
            )
        if not args.force:
            what = "exists (a symbolic link)" if stat.S_ISLNK(mode) else "exists"
            raise UsageError(f"{out} {what}; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"{flag} {out}: directory {out.parent} does not exist")
    _check_writable(out)
    return out


def _lstat_mode(path: Path) -> int | None:
    """``path``'s file type and mode, not following a symbolic link; ``None`` if absent."""
    try:
        return os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_writable(out: Path) -> None:
    """Can repfx create its temporary directory next to ``out``? (Before any slow work.)"""
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent):
            pass
    except OSError as exc:
        raise UsageError(
            f"-o {out}: cannot write into {out.parent} ({exc.strerror or exc})"
        ) from None


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


def _timed(progress: Progress, message: str, step: Callable[[], object]) -> tuple[object, float]:
    progress(f"{message} ...")
    start = time.perf_counter()
    result = step()
    return result, time.perf_counter() - start


def _example_inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> tuple:
    """Seeded random normal inputs; :class:`UsageError` for shapes too large to allocate."""
    generator = torch.Generator().manual_seed(0)
    nbytes = sum(math.prod(s) for s in shapes) * max(4, dtype.itemsize)  # drawn in float32
    memory = _physical_memory()
    if memory is not None and nbytes > memory:
        raise UsageError(
            f"--input-shape {_shapes_text(shapes)}: the input is too large: "
            f"{_gigabytes(nbytes)} of {str(dtype).removeprefix('torch.')}, more than this "
            f"machine's {_gigabytes(memory)} of memory; pass a smaller shape"
        )
    try:
        return tuple(torch.randn(shape, generator=generator).to(dtype) for shape in shapes)
    except (RuntimeError, MemoryError) as exc:
        raise UsageError(
            f"--input-shape {_shapes_text(shapes)}: the input is too large: "
            f"{_gigabytes(nbytes)} could not be allocated ({type(exc).__name__}); pass a "
            "smaller shape"
        ) from exc


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _check_input_count(model: nn.Module, shapes: list[tuple[int, ...]], description: str) -> None:
    """One ``--input-shape`` per positional input of ``model.forward``: fold traces the model
    with torch.fx, which would ignore extra inputs, so count them before."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no introspectable signature: fold will tell
        return
    try:
        signature.bind(*shapes)
    except TypeError as exc:
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        name = f"{type(model).__name__}.forward{bare}"
        raise UsageError(
            f"wrong --input-shape {_shapes_text(shapes)} for {description}: "
            f"{len(shapes)} example input{'s' if len(shapes) != 1 else ''} given, but {name} "
            f"cannot take them ({exc}); pass one --input-shape per input of forward"
        ) from None


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


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


def _optimize(args: argparse.Namespace) -> int:
    if args.list:
        return _list_models(args)
    if args.source is None:
        raise UsageError("optimize needs a SOURCE: a model name, timm:NAME, module:factory or file")
    progress = Progress(args.quiet or False)
    options = _checked_options(args)
    result: dict = {"repfx": __version__, "source": args.source}
    started = time.perf_counter()

    loaded, model, seconds = _load_model(args, progress)
    result["load_seconds"] = seconds
    dtype = _model_dtype(model)
    shapes = _input_shapes(args, options, loaded, model)
    inputs = _example_inputs(shapes, dtype) if shapes else None
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
        result["graph"] = _draw(report, options.picture, progress)
    if options.out is not None:
        target = Target(
            options.out, options.fmt, force=args.force, static_shapes=args.static_shapes
        )
        result["output"] = _write(folded, model, inputs, target, not args.no_verify, progress)
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
    fmt = _output_format(args)
    out = _check_output_path(args)
    picture = None if args.graph is None else _writable_target(Path(args.graph), "--graph", args)
    shapes = [parse_shape(s) for s in args.input_shape or []]
    if args.benchmark_rounds < 1:
        raise UsageError("--benchmark-rounds must be at least 1")
    return OptimizeOptions(fmt, out, picture, shapes)


def _load_model(
    args: argparse.Namespace, progress: Progress
) -> tuple[LoadedModel, nn.Module, float]:
    """SOURCE loaded; its model in eval mode, cast to ``--dtype``; and the seconds it took."""
    loaded, seconds = _timed(
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
        _check_input_count(model, shapes, loaded.description)
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
        return _timed(
            progress,
            step,
            lambda: fold(
                model,
                inputs,
                verify=verify,
                capture=args.capture,
                fold_norm_affine=args.fold_norm_affine,
            ),
        )
    except ExampleInputError as exc:
        given = _shapes_text(shapes)
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
        print(_human_report(report, result, explain=args.explain, everything=args.all))


def _draw(report: FoldReport, path: Path, progress: Progress) -> dict:
    """Draw one folded block before and after into ``path`` (``--graph``)."""
    progress(f"drawing a folded block into {path} ...")
    try:
        block = report.draw(path)
    except DrawError as exc:
        if "matplotlib" in str(exc):
            raise UsageError(f"--graph: {exc}") from exc
        return {"path": None, "why": str(exc)}
    except OSError as exc:
        raise UsageError(f"--graph {path}: cannot write it: {exc.strerror or exc}") from exc
    return {"path": str(path), "block": block}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to write: OUT, its format, whether existing files may be replaced, and whether
    a ``.pt2`` / ``.onnx`` file fixes the example inputs' shapes (else: a dynamic batch)."""

    path: Path
    fmt: str
    force: bool
    static_shapes: bool = False


def _write(
    folded: nn.Module,
    model: nn.Module,
    inputs: tuple | None,
    target: Target,
    verify: bool,
    progress: Progress,
) -> dict:
    """Write ``folded`` to ``target`` (checking the file with ``verify``); the writer's
    refusals and the file system's errors become CLI errors."""
    out = target.path
    try:
        info, check = _write_format(folded, model, inputs, target, verify, progress)
    except ExportMismatchError as exc:
        raise CliError(
            f"verification failed: {exc}; nothing written", EXIT_VERIFY, {"check": exc.check}
        ) from exc
    except OutputExistsError as exc:  # e.g. ONNX's external data next to OUT
        raise UsageError(f"{exc.path} exists; pass --force to overwrite it") from exc
    except OutputNotAFileError as exc:
        message = f"{exc.path} is not a regular file; repfx only writes regular files"
        raise UsageError(message) from exc
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc
    info["bytes"] = out.stat().st_size
    info["check"] = dataclasses.asdict(check) if check else None
    return info


def _write_format(
    folded: nn.Module,
    model: nn.Module,
    inputs: tuple | None,
    target: Target,
    verify: bool,
    progress: Progress,
) -> tuple[dict, object]:
    """Write with the writer of ``target.fmt``: the output's info and its check."""
    out, fmt, overwrite = target.path, target.fmt, target.force
    dynamic = not target.static_shapes
    info: dict = {"path": str(out), "format": fmt, "loader": FORMAT_LOADERS[fmt]}
    if fmt == "pt":
        check, _ = _timed(
            progress,
            f"writing {out}",
            lambda: save_pt(folded, out, inputs if verify else None, overwrite=overwrite),
        )
        return info, check
    if fmt == "pt2":
        check, _ = _timed(
            progress,
            f"exporting with torch.export to {out}",
            lambda: save_pt2(
                folded, inputs, out, verify=verify, overwrite=overwrite, dynamic_batch=dynamic
            ),
        )
        return info, check
    exported, _ = _timed(
        progress,
        f"exporting to ONNX, checking{' and running with onnxruntime' if verify else ''}",
        lambda: export_onnx(
            folded, inputs, out, verify=verify, overwrite=overwrite, dynamic_batch=dynamic
        ),
    )
    info["onnx"] = {
        "exporter": exported.exporter,
        "opset": exported.opset,
        "nodes": exported.nodes,
        "ops": exported.ops,
        "files": [str(f) for f in exported.files],
    }
    progress("exporting the unfolded model to ONNX for comparison ...")
    try:
        before = onnx_op_counts_of(model, inputs, dynamic_batch=dynamic)
        info["onnx"]["unfolded_nodes"] = sum(before.values())
        info["onnx"]["unfolded_ops"] = dict(sorted(before.items()))
    except ExportError as exc:
        info["onnx"]["unfolded_error"] = str(exc)
    return info, exported.check


def _human_report(report: FoldReport, result: dict, explain: bool, everything: bool) -> str:
    fold, total = result["fold_seconds"], result["seconds"]
    lines = [str(report), f"  time: fold {fold:.1f} s, whole run {total:.1f} s"]
    graph = result.get("graph")
    if graph:
        drawn = graph["path"]
        lines.append(f"drew {graph['block'] or 'the model'} before and after into {drawn}"
                     if drawn else f"no picture: {graph['why']}")  # fmt: skip
    output = result.get("output")
    if output:
        size = output["bytes"] / 1e6
        lines.append(f"wrote {output['path']} ({output['format']}, {size:.1f} MB)")
        check = output["check"]
        if check:
            sizes = check.get("batch_sizes") or ()
            at = f" at batch {' and '.join(map(str, sizes))}" if len(sizes) > 1 else ""
            lines.append(
                f"  reloaded with {check['runner']}{at}: max abs {check['max_abs_error']:.3g}, "
                f"max rel {check['max_rel_error']:.3g} (tolerance {check['tolerance']:.1g})"
            )
        onnx = output.get("onnx")
        if onnx:
            lines.append(_onnx_lines(onnx))
        lines.append(f"  load it with {output['loader']}")
    bench = result.get("benchmark")
    if bench:
        threads = f"{bench['threads']} thread{'s' if bench['threads'] != 1 else ''}"
        lines.append(
            f"benchmark: eager latency {bench['before_ms']:.2f} ms -> {bench['after_ms']:.2f} ms "
            f"(speedup {bench['speedup']:.2f}x), median of {bench['rounds']} interleaved rounds, "
            f"{threads}; median paired ratio after/before {bench['paired_ratio_median']:.3f}"
        )
    if explain:
        which = "every candidate" if everything else "what you could change"
        lines.append(f"not folded ({which}), with reasons:")
        text = report.explain(everything=everything)
        lines.append(text or ("  (every candidate was folded)" if everything else "  (nothing)"))
    return "\n".join(lines)


def _onnx_lines(onnx: dict) -> str:
    header = f"  onnx ({onnx['exporter']} exporter, opset {onnx['opset']})"
    if "unfolded_nodes" not in onnx:
        why = onnx.get("unfolded_error", "")
        return f"{header}: {onnx['nodes']} nodes (unfolded model not exported: {why})"
    before, after = onnx["unfolded_ops"], onnx["ops"]
    lines = [f"{header}: nodes {onnx['unfolded_nodes']} -> {onnx['nodes']} (unfolded -> folded)"]
    for op in sorted(set(before) | set(after)):
        lines.append(f"    {op:<22} {before.get(op, 0):>5} -> {after.get(op, 0)}")
    return "\n".join(lines)


def _list_models(_: argparse.Namespace) -> int:
    print("\n".join(models.names()))
    print(
        "(also: timm:NAME for timm's models, package.module:factory for your own code, or a "
        "state-dict file with --arch)",
        file=sys.stderr,
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repfx",
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 ok, 1 verification failed, 2 usage, 3 untraceable model, "
        "4 unreadable SOURCE, 5 refused pickle, 6 export failed, 7 internal error",
    )
    parser.add_argument("--version", action="version", version=f"repfx {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--list", action="store_true", help="list built-in models and exit")
    sub = parser.add_subparsers(dest="command")
    opt = sub.add_parser(
        "optimize",
        help="fold a model, print the report, write OUT",
        description="Fold SOURCE, verify it, print the report and (with -o) write OUT.",
    )
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
    opt.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    opt.add_argument(
        "--static-shapes",
        action="store_true",
        help="fix the example inputs' shapes in a .pt2 / .onnx OUT (default: dynamic batch)",
    )
    opt.add_argument(
        "--arch", help="the model a state-dict SOURCE is loaded into (name, timm:NAME, module:fn)"
    )
    opt.add_argument("--weights", metavar="FILE", help="state dict to load into a named model")
    opt.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow SOURCE to be a pickled module (loading it runs code from the file)",
    )
    opt.add_argument(
        "--input-shape",
        action="append",
        metavar="SHAPE",
        help="example input shape, e.g. 1,3,224,224; repeat for several inputs (default: "
        "inferred for built-in and timm models)",
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
        help="draw one folded block before and after into PICTURE (.svg, .png or .pdf; needs "
        "matplotlib: pip install 'repfx[draw]')",
    )
    opt.add_argument(
        "--fold-norm-affine",
        action="store_true",
        help="also move each norm's own weight and bias into the linears / convs that read it "
        "(affine-free norms, as rotation-based quantization wants; linears may gain a bias)",
    )
    opt.add_argument("--no-verify", action="store_true", help="skip the equivalence checks")
    opt.add_argument(
        "--explain",
        action="store_true",
        help="list the candidates not folded that you could change (with --all: every one)",
    )
    opt.add_argument(
        "--all", action="store_true", help="with --explain: every candidate not folded"
    )
    opt.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    opt.add_argument(
        "--benchmark", action="store_true", help="time eager inference before -> after"
    )
    opt.add_argument("--benchmark-rounds", type=int, default=30, metavar="N")
    opt.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    opt.add_argument(  # also accepted after the command; SUPPRESS keeps a leading --debug
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    opt.add_argument("--list", action="store_true", help="list built-in models and exit")
    opt.set_defaults(run=_optimize)
    sub.add_parser("models", help="list built-in models").set_defaults(run=_list_models)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        if args.list:
            return _list_models(args)
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
        return _report_error(exc, args)


def _report_error(exc: Exception, args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
