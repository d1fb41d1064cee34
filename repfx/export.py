"""Writing a folded model to disk, and checking what was written.

Three formats, one writer each:

- ``.pt``   :func:`save_pt` — ``torch.save`` of the module (a pickle: loading it runs code);
- ``.pt2``  :func:`save_pt2` — ``torch.export.export`` + ``torch.export.save``
  (load with ``torch.export.load(path).module()``);
- ``.onnx`` :func:`export_onnx` — ``torch.onnx.export`` (the torch.export-based exporter,
  which needs onnxscript; the TorchScript one when onnxscript is missing), checked with
  ``onnx.checker`` and run with onnxruntime.

Every writer is atomic: it writes into a temporary directory next to the destination and
renames into place only after the file was checked, so a failed export leaves nothing behind
and never a half-written file. Each file renamed into place (the destination, and companion
files such as ONNX's external ``OUT.onnx.data``) replaces only a regular file or a symbolic
link (the link itself, never its target), and with ``overwrite=False`` nothing that exists.
With example inputs, every writer loads what it wrote back with the loader of its format, runs
it on them and compares the outputs with the module's own, within ``repfx.proof.tolerances``; a
difference raises :class:`ExportMismatchError`.

``.pt2`` and ``.onnx`` files take a dynamic batch by default (``dynamic_batch=True``): the first
dimension of every tensor input is one symbolic ``batch`` size, and the written file is checked
at two batch sizes — the example inputs', and one more (each input grown by its first item). A
model that specialises its batch cannot be written so (:class:`ExportError`, which says to pass
``dynamic_batch=False``, the CLI's ``--static-shapes``); then the example inputs' shapes are
fixed in the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import Error, one_line
from .proof.inputs import as_inputs, run
from .proof.tolerances import max_errors, output_tensors, reference_dtype, tolerance_for

# Above this many bytes of weights, ONNX keeps them in an external ``OUT.onnx.data`` file
# (protobuf cannot serialise a message over 2 GiB).
ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportError(Error, RuntimeError):
    """The module could not be exported, or the exported file failed its check."""


class OutputExistsError(ExportError):
    """A file the writer would put in place exists, and ``overwrite=False``."""

    def __init__(self, path: Path):
        super().__init__(f"{path} exists")
        self.path = path


class OutputNotAFileError(ExportError):
    """A file the writer would put in place is a directory, device, pipe or socket."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is not a regular file; only regular files are replaced")
        self.path = path


class ExportMismatchError(ExportError):
    """The exported file runs, but its outputs differ from the module's beyond tolerance."""

    def __init__(self, message: str, check: OutputCheck):
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class OutputCheck:
    """The exported file's outputs compared with the module's on the example inputs."""

    runner: str  # what ran the file: "torch.load", "torch.export.load", "onnxruntime"
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    passed: bool
    batch_sizes: tuple[int, ...] = ()  # the batch sizes checked (a dynamic-batch file: two)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    exporter: str  # "dynamo" (torch.export-based) or "torchscript"
    opset: int
    nodes: int  # nodes in the ONNX graph (including those of subgraphs)
    ops: dict[str, int]  # node count per op type ("Conv", "Add", ...; "domain::Op" off ai.onnx)
    check: OutputCheck | None  # onnxruntime vs the PyTorch module; None without verification
    files: list[Path] = field(default_factory=list)  # path, plus external data if any


def export_onnx(
    folded: nn.Module,
    example_inputs: torch.Tensor | Sequence[object],
    path: str | os.PathLike,
    *,
    verify: bool = True,
    opset: int | None = None,
    dynamo: bool | None = None,
    overwrite: bool = True,
    dynamic_batch: bool = True,
) -> OnnxExport:
    """Export ``folded`` to ONNX at ``path``, check it, run it, and compare.

    The graph is checked with ``onnx.checker``; with ``verify`` (the default) onnxruntime runs
    it on ``example_inputs`` and its outputs must match ``folded``'s within
    ``repfx.proof.tolerances`` (:class:`ExportMismatchError` otherwise). Nothing is written unless
    every check passes; an existing file at ``path`` (or external data next to it) is replaced
    unless ``overwrite=False`` (:class:`OutputExistsError`). ``dynamo=None`` uses the
    torch.export-based exporter when onnxscript is installed, else the TorchScript one. With
    ``dynamic_batch`` (the default) the batch dimension stays symbolic and onnxruntime checks
    two batch sizes; otherwise the shapes of ``example_inputs`` are fixed in the graph.
    """
    inputs = as_inputs(example_inputs)
    path = Path(path)
    if dynamo is None:
        dynamo = _has_onnxscript()
    try:
        import onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs onnx and onnxruntime: pip install 'repfx[onnx]'"
        ) from None
    external = _weight_bytes(folded) > ONNX_EXTERNAL_DATA_BYTES
    with _atomic_output(path, overwrite) as tmp:
        target = tmp / path.name
        _torch_onnx_export(
            folded, inputs, target, dynamo=dynamo, opset=opset, external=external,
            dynamic_batch=dynamic_batch,
        )  # fmt: skip
        try:
            onnx.checker.check_model(str(target))
        except Exception as exc:
            message = f"onnx.checker rejected the exported model: {one_line(exc)}"
            raise ExportError(message) from exc
        proto = onnx.load(str(target), load_external_data=False)
        ops = onnx_op_counts(proto)
        check = None
        if verify:
            check = _compare_batches(
                folded, inputs, dynamic_batch, lambda x: _run_onnxruntime(target, x), "onnxruntime"
            )
        files = [path.parent / f.name for f in tmp.iterdir()]
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxExport(
        path=path,
        exporter="dynamo" if dynamo else "torchscript",
        opset=opset_used,
        nodes=sum(ops.values()),
        ops=dict(sorted(ops.items())),
        check=check,
        files=sorted(files, key=lambda f: f != path),
    )


def onnx_op_counts(model: object) -> Counter[str]:
    """Node count per op type of an ONNX model (a ``ModelProto``, ``GraphProto`` or a path),
    including the nodes of subgraphs (``If`` / ``Loop`` bodies)."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    counts: Counter[str] = Counter()
    for node in graph.node:
        domain = node.domain if node.domain not in ("", "ai.onnx") else ""
        counts[f"{domain}::{node.op_type}" if domain else node.op_type] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                counts.update(onnx_op_counts(sub))
    return counts


def onnx_op_counts_of(
    module: nn.Module,
    example_inputs: torch.Tensor | Sequence[object],
    dynamo: bool | None = None,
    dynamic_batch: bool = False,
) -> Counter[str]:
    """Node count per op type of ``module``'s ONNX export (written to a temporary directory and
    removed); used to compare a folded model's ONNX with the unfolded model's (exported the
    same way: ``dynamic_batch`` as the folded one's)."""
    if dynamo is None:
        dynamo = _has_onnxscript()
    with tempfile.TemporaryDirectory(prefix="repfx-onnx-") as tmp:
        target = Path(tmp) / "model.onnx"
        external = _weight_bytes(module) > ONNX_EXTERNAL_DATA_BYTES
        _torch_onnx_export(
            module, as_inputs(example_inputs), target, dynamo=dynamo, opset=None,
            external=external, dynamic_batch=dynamic_batch,
        )  # fmt: skip
        return onnx_op_counts(target)


def save_pt(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[object] | None = None,
    *,
    overwrite: bool = True,
) -> OutputCheck | None:
    """``torch.save(module, path)``, atomically; with ``example_inputs`` the file is loaded back
    (``torch.load(weights_only=False)`` — it is the file just written) and compared."""
    path = Path(path)
    with _atomic_output(path, overwrite) as tmp:
        target = tmp / path.name
        torch.save(module, target)
        if example_inputs is None:
            return None
        inputs = as_inputs(example_inputs)
        return _compare(
            module,
            inputs,
            lambda: run(torch.load(target, weights_only=False), inputs),
            "torch.load",
        )


def save_pt2(
    module: nn.Module,
    example_inputs: torch.Tensor | Sequence[object],
    path: str | os.PathLike,
    *,
    verify: bool = True,
    overwrite: bool = True,
    dynamic_batch: bool = True,
) -> OutputCheck | None:
    """``torch.export.export(module, example_inputs)`` saved with ``torch.export.save``,
    atomically; with ``verify`` the file is loaded back (``torch.export.load``) and compared,
    at two batch sizes with ``dynamic_batch``."""
    path = Path(path)
    inputs = as_inputs(example_inputs)
    shapes = batch_shapes(inputs) if dynamic_batch else None
    try:
        with torch.no_grad():
            program = torch.export.export(
                module, tracing_inputs(inputs, dynamic_batch), dynamic_shapes=shapes
            )
    except Exception as exc:
        raise ExportError(f"torch.export failed: {one_line(exc)}{_static_hint(shapes)}") from exc
    with _atomic_output(path, overwrite) as tmp:
        target = tmp / path.name
        torch.export.save(program, target)
        if not verify:
            return None
        loaded = torch.export.load(target).module()
        return _compare_batches(
            module, inputs, dynamic_batch, lambda x: run(loaded, x), "torch.export.load"
        )


BATCH = "batch"


def batch_shapes(inputs: tuple) -> tuple:
    """``dynamic_shapes`` for ``torch.export``: dimension 0 of every tensor input is one
    shared symbolic batch size."""
    batch = torch.export.Dim(BATCH, min=1)
    return tuple({0: batch} if _batched(x) else None for x in inputs)


def tracing_inputs(inputs: tuple, dynamic_batch: bool) -> tuple:
    """What to export on: for a dynamic batch, never a batch of one (which every exporter
    specialises to the constant 1)."""
    if dynamic_batch and any(_batched(x) and x.shape[0] == 1 for x in inputs):
        return grown_batch(inputs)
    return inputs


def grown_batch(inputs: tuple) -> tuple:
    """``inputs`` with one more item in the batch (each tensor input's first item appended)."""
    return tuple(torch.cat([x, x[:1]]) if _batched(x) else x for x in inputs)


def _batched(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] >= 1


def _static_hint(shapes: object) -> str:
    if shapes is None:
        return ""
    return (
        "; the file was to take a dynamic batch (dimension 0 of each input): a model that "
        "fixes its batch size needs static shapes (dynamic_batch=False, --static-shapes)"
    )


def _compare_batches(
    module: nn.Module, inputs: tuple, dynamic_batch: bool, run_exported, runner: str
) -> OutputCheck:
    """Compare at the example inputs' batch size and, for a dynamic batch, at one more."""
    sets = [inputs, grown_batch(inputs)] if dynamic_batch else [inputs]
    checks = [_compare(module, x, lambda x=x: run_exported(x), runner) for x in sets]
    worst = max(checks, key=lambda c: c.max_rel_error)
    sizes = tuple(int(next((t.shape[0] for t in x if _batched(t)), 0)) for x in sets)
    return dataclasses.replace(worst, batch_sizes=sizes)


def _torch_onnx_export(
    module: nn.Module,
    inputs: tuple,
    target: Path,
    *,
    dynamo: bool,
    opset: int | None,
    external: bool,
    dynamic_batch: bool,
) -> None:
    kwargs: dict[str, object] = {"dynamo": dynamo, "verbose": False, "opset_version": opset}
    if dynamo:
        kwargs["external_data"] = external
        if dynamic_batch:
            kwargs["dynamic_shapes"] = batch_shapes(inputs)
    elif dynamic_batch:
        names = [f"input_{i}" for i in range(len(inputs))]
        kwargs["input_names"] = names
        kwargs["dynamic_axes"] = {
            name: {0: BATCH} for name, x in zip(names, inputs, strict=True) if _batched(x)
        }
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice: choosing it was deliberate.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            with torch.no_grad():
                torch.onnx.export(
                    module, tracing_inputs(inputs, dynamic_batch), str(target), **kwargs
                )
    except Exception as exc:
        hint = _static_hint(dynamic_batch or None)
        raise ExportError(f"torch.onnx.export failed: {one_line(exc)}{hint}") from exc
    if not target.exists():
        raise ExportError(f"torch.onnx.export wrote nothing to {target}")


def _run_onnxruntime(path: Path, inputs: tuple) -> list[torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "checking the ONNX file needs onnxruntime: pip install onnxruntime"
        ) from None
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if any(t.dtype == torch.bfloat16 for t in tensors):
        raise ExportError("onnxruntime cannot be fed bfloat16 inputs; check in float32 instead")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(tensors):
            raise ExportError(f"the ONNX graph has {len(names)} inputs, not {len(tensors)}")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]
    except ExportError:
        raise
    except Exception as exc:
        message = f"onnxruntime could not run the exported model: {one_line(exc)}"
        raise ExportError(message) from exc


def _compare(module: nn.Module, inputs: tuple, run_exported, runner: str) -> OutputCheck:
    """One comparison, at ``inputs``; ``run_exported()`` runs the written file on them."""
    expected = run(module, inputs)
    actual = run_exported()
    try:
        abs_err, rel_err = max_errors(output_tensors(actual), output_tensors(expected))
    except ValueError as exc:
        raise ExportError(f"{runner}: the exported model's outputs do not match: {exc}") from exc
    tol = tolerance_for(reference_dtype(expected))
    check = OutputCheck(runner, abs_err, rel_err, tol, passed=rel_err <= tol)
    if not check.passed:
        raise ExportMismatchError(
            f"the file run with {runner} differs from the PyTorch model: max abs error "
            f"{abs_err:.3g}, relative {rel_err:.3g} > tolerance {tol:.1g}",
            check,
        )
    return check


@contextlib.contextmanager
def _atomic_output(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """A temporary directory next to ``path``; what is written into it is renamed into
    ``path.parent`` (companion files first, ``path`` itself last) when the block succeeds,
    and removed when it fails (or is interrupted). Every destination is checked before the
    first rename (:func:`_check_replaceable`), so a refusal replaces nothing."""
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: {parent} is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        yield tmp
        items = sorted(tmp.iterdir(), key=lambda f: f.name == path.name)
        for item in items:
            _check_replaceable(parent / item.name, overwrite)
        for item in items:
            os.replace(item, parent / item.name)  # a symbolic link is replaced, not followed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(destination: Path, overwrite: bool) -> None:
    """May a finished file be renamed onto ``destination``? Yes if nothing is there; if a
    regular file or a symbolic link is, only with ``overwrite``; never onto anything else."""
    try:
        mode = os.lstat(destination).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputNotAFileError(destination)
    if not overwrite:
        raise OutputExistsError(destination)


def _weight_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True
