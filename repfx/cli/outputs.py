"""Writing files: OUT's format, the checks that OUT and ``--graph``'s picture may be written
(before any slow work), and writing the folded model to OUT with its format's writer."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..export import (
    ExportError,
    ExportMismatchError,
    OnnxExport,
    OutputExistsError,
    OutputNotAFileError,
    export_onnx,
    onnx_op_counts_of,
    save_pt,
    save_pt2,
)
from ..sources import is_file_source
from .errors import EXIT_VERIFY, CliError, UsageError
from .progress import Progress, timed

FORMATS = {".pt": "pt", ".pth": "pt", ".pt2": "pt2", ".onnx": "onnx"}

FORMAT_LOADERS = {
    "pt": "torch.load(path, weights_only=False)",
    "pt2": "torch.export.load(path).module()",
    "onnx": "onnxruntime.InferenceSession(path)",
}


def output_format(args: argparse.Namespace) -> str | None:
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


# The picture formats ``--graph`` writes (matplotlib's writers, chosen by suffix).
PICTURE_SUFFIXES = (".svg", ".png", ".pdf", ".jpg", ".jpeg")
PICTURE_SUFFIXES_TEXT = ", ".join(PICTURE_SUFFIXES[:-2]) + " or .jpg"


def check_picture_path(args: argparse.Namespace) -> Path | None:
    """``--graph``'s picture, if it can be drawn and written: a known suffix, matplotlib
    installed, a writable target (see :func:`writable_target`); ``--graph-block`` only with
    it."""
    if args.graph is None:
        if args.graph_block is not None:
            raise UsageError("--graph-block needs a picture to draw into: --graph PICTURE")
        return None
    picture = Path(args.graph)
    if picture.suffix.lower() not in PICTURE_SUFFIXES:
        raise UsageError(
            f"--graph {args.graph}: cannot draw a {picture.suffix or 'suffix-less'} file; name "
            f"the picture with one of {', '.join(PICTURE_SUFFIXES)}"
        )
    try:
        import matplotlib  # noqa: F401  (only whether it is there)
    except ImportError:
        raise UsageError("--graph: drawing needs matplotlib: pip install 'repfx[draw]'") from None
    return writable_target(picture, "--graph", args)


def check_output_path(args: argparse.Namespace) -> Path | None:
    """OUT, if it may be written (see :func:`writable_target`)."""
    return None if args.output is None else writable_target(Path(args.output), "-o", args)


def writable_target(out: Path, flag: str, args: argparse.Namespace) -> Path:
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


@dataclasses.dataclass(frozen=True)
class Target:
    """Where to write: OUT, its format, whether existing files may be replaced, and whether
    a ``.pt2`` / ``.onnx`` file fixes the example inputs' shapes (else: a dynamic batch)."""

    path: Path
    fmt: str
    force: bool
    static_shapes: bool = False


def write_output(
    folded: nn.Module,
    model: nn.Module,
    inputs: tuple | None,
    target: Target,
    verify: bool,
    progress: Progress,
) -> dict:
    """Write ``folded`` to ``target`` with the writer of ``target.fmt`` (checking the file with
    ``verify``): the output's info. The writer's refusals and the file system's errors become
    CLI errors."""
    out, fmt, overwrite = target.path, target.fmt, target.force
    dynamic = not target.static_shapes
    info: dict = {"path": str(out), "format": fmt, "loader": FORMAT_LOADERS[fmt]}
    with _writing_errors_as_cli_errors(out):
        if fmt == "pt":
            check, _ = timed(
                progress,
                f"writing {out}",
                lambda: save_pt(folded, out, inputs if verify else None, overwrite=overwrite),
            )
        elif fmt == "pt2":
            check, _ = timed(
                progress,
                f"exporting with torch.export to {out}",
                lambda: save_pt2(
                    folded, inputs, out, verify=verify, overwrite=overwrite, dynamic_batch=dynamic
                ),
            )
        else:
            exported, _ = timed(
                progress,
                f"exporting to ONNX, checking{' and running with onnxruntime' if verify else ''}",
                lambda: export_onnx(
                    folded, inputs, out, verify=verify, overwrite=overwrite, dynamic_batch=dynamic
                ),
            )
            check = exported.check
            info["onnx"] = _onnx_info(exported, model, inputs, dynamic, progress)
    info["bytes"] = out.stat().st_size
    info["check"] = dataclasses.asdict(check) if check else None
    return info


@contextlib.contextmanager
def _writing_errors_as_cli_errors(out: Path) -> Iterator[None]:
    """The writer's refusals and the file system's errors while writing ``out``, as CLI
    errors."""
    try:
        yield
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


def _onnx_info(
    exported: OnnxExport, model: nn.Module, inputs: tuple | None, dynamic: bool, progress: Progress
) -> dict:
    """The ONNX file's info, with the node counts of the unfolded model exported for comparison
    (or why it could not be)."""
    info = {
        "exporter": exported.exporter,
        "opset": exported.opset,
        "nodes": exported.nodes,
        "ops": exported.ops,
        "files": [str(f) for f in exported.files],
    }
    progress("exporting the unfolded model to ONNX for comparison ...")
    try:
        before = onnx_op_counts_of(model, inputs, dynamic_batch=dynamic)
        info["unfolded_nodes"] = sum(before.values())
        info["unfolded_ops"] = dict(sorted(before.items()))
    except ExportError as exc:
        info["unfolded_error"] = str(exc)
    return info
