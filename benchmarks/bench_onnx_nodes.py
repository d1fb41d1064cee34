"""ONNX node counts after onnxruntime's graph optimizer, unfolded vs repfx-folded.

For each model in ``--models`` (default: timm ``caformer_s18`` and torchvision
``mobilenet_v3_small``; ``timm:NAME`` or ``tv:NAME``), both forms from ONE set of weights:

- ``unfolded``  the model, random init, eval mode, its foldable parameters (norm statistics and
                affines, biases, LayerScales) re-drawn at O(1) with
                ``repfx.proof.redraw.redraw_foldable_parameters_``;
- ``folded``    ``repfx.fold(unfolded, (x,))`` with verification on.

Method:

1. Export both forms with ``repfx.export_onnx`` (the same exporter for both: the
   torch.export-based one when onnxscript is installed), which checks each file with
   ``onnx.checker`` and compares onnxruntime's output with the PyTorch module's on the example
   batch ``x`` (``--batch`` x 3 x ``--size`` x ``--size``); static shapes unless
   ``--dynamic-batch``. Files go to a temporary directory, removed at the end.
2. Load each file in an onnxruntime CPU session with ``graph_optimization_level =
   ORT_ENABLE_ALL`` and ``optimized_model_filepath`` set, so onnxruntime writes the graph it
   will run (fusions, constant folding, the NCHWc layout transform: the optimized graph is
   specific to this CPU).
3. Count the nodes per op type of each optimized graph (``domain::Op`` off the default
   domain, subgraph nodes included) and print op type, unfolded count, folded count and the
   change, flagging every op type whose count rises after folding (with the names of its
   nodes in the folded graph).
4. Run both sessions on a fresh input (another seed) and assert with
   ``repfx.testing.assert_close`` that the folded model's output agrees with the unfolded
   one's.

Run ``python benchmarks/bench_onnx_nodes.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

# Shared with the RIFormer benchmark in this directory (the script's own directory is on
# sys.path when it runs as ``python benchmarks/bench_onnx_nodes.py``).
from bench_riformer import machine_lines, print_section
from torch import nn

import repfx
from repfx.export import onnx_op_counts
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.proof.tolerances import max_errors
from repfx.testing import assert_close

MODELS: tuple[str, ...] = ("timm:caformer_s18", "tv:mobilenet_v3_small")
FORMS: tuple[str, ...] = ("unfolded", "folded")
MAX_NODE_NAMES = 12  # node names listed per op type whose count rises


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Node counts per op type of onnxruntime-optimized ONNX graphs: unfolded "
        "vs repfx-folded."
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help="timm:NAME or tv:NAME (default: two)"
    )
    parser.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    parser.add_argument("--size", type=int, default=224, help="input height = width (224)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and onnxruntime intra-op threads"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument(
        "--dynamic-batch", action="store_true", help="export with a symbolic batch dimension"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="also print markdown tables for RESULTS.md"
    )
    args = parser.parse_args(argv)
    if min(args.batch, args.size) < 1:
        parser.error("--batch and --size must be >= 1")
    for spec in args.models:
        if spec.partition(":")[0] not in ("timm", "tv"):
            parser.error(f"model {spec!r}: expected timm:NAME or tv:NAME")
    return args


def version_lines() -> list[str]:
    return [f"onnx     : {onnx.__version__}", f"ort      : {ort.__version__}"]


# --------------------------------------------------------------------------- models


def create(spec: str) -> nn.Module:
    source, _, name = spec.partition(":")
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def build_forms(spec: str, x: torch.Tensor, seed: int) -> tuple[dict[str, nn.Module], float]:
    """Both forms of the model, and the seconds ``repfx.fold`` took."""
    torch.manual_seed(seed)
    unfolded = redraw_foldable_parameters_(create(spec), seed).eval()
    start = time.perf_counter()
    folded = repfx.fold(unfolded, (x,)).eval()
    return {"unfolded": unfolded, "folded": folded}, time.perf_counter() - start


# --------------------------------------------------------------------------- ONNX


@dataclass
class OnnxForm:
    """One form's exported file, its onnxruntime session and optimized graph's counts."""

    exported_nodes: int
    check_rel_error: float  # onnxruntime vs PyTorch on the example batch
    session: ort.InferenceSession
    optimized: onnx.ModelProto
    counts: Counter[str]


def optimized_session(path: Path, threads: int) -> tuple[ort.InferenceSession, Path]:
    """An ORT_ENABLE_ALL CPU session of ``path``; it writes its optimized graph next to it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # not the warning that NCHWc graphs are CPU-specific
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, Path(options.optimized_model_filepath)


def export_form(
    module: nn.Module, x: torch.Tensor, path: Path, dynamic_batch: bool
) -> tuple[OnnxForm, str]:
    """Export ``module`` to ``path``, optimize it; also return the exporter's name."""
    written = repfx.export_onnx(module, (x,), path, dynamic_batch=dynamic_batch)
    session, optimized_path = optimized_session(path, torch.get_num_threads())
    optimized = onnx.load(str(optimized_path), load_external_data=False)
    rel_error = written.check.max_rel_error if written.check else float("nan")
    counts = onnx_op_counts(optimized)
    form = OnnxForm(written.nodes, rel_error, session, optimized, counts)
    return form, f"{written.exporter}, opset {written.opset}"


def run_session(session: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def node_names(model: onnx.ModelProto, op: str) -> list[str]:
    """Names of the top-level nodes of ``model`` whose op type (as counted) is ``op``."""
    domain, _, op_type = op.rpartition("::")
    return [
        n.name or "(unnamed)"
        for n in model.graph.node
        if n.op_type == op_type and (n.domain if n.domain != "ai.onnx" else "") == domain
    ]


# --------------------------------------------------------------------------- reporting


def rising(forms: dict[str, OnnxForm]) -> list[str]:
    before, after = forms["unfolded"].counts, forms["folded"].counts
    return sorted(op for op in after if after[op] > before[op])


def table_lines(forms: dict[str, OnnxForm]) -> list[str]:
    before, after = forms["unfolded"].counts, forms["folded"].counts
    ops, up = sorted(before.keys() | after.keys()), set(rising(forms))
    width = max(len("op_type"), *(len(op) for op in ops))
    lines = [f"{'op_type':<{width}}  {'unfolded':>8}  {'folded':>6}  {'change':>6}"]
    for op in [*ops, "total"]:
        b = sum(before.values()) if op == "total" else before[op]
        a = sum(after.values()) if op == "total" else after[op]
        flag = "  <-- RISES" if op in up else ""
        lines.append(f"{op:<{width}}  {b:8d}  {a:6d}  {a - b:+6d}{flag}")
    return lines


def table_markdown(spec: str, forms: dict[str, OnnxForm]) -> list[str]:
    before, after = forms["unfolded"].counts, forms["folded"].counts
    up = set(rising(forms))
    lines = [f"**{spec}**", "", "| op_type | unfolded | folded | change |", "|---|---:|---:|---:|"]
    for op in sorted(before.keys() | after.keys()):
        mark = " (rises)" if op in up else ""
        lines.append(f"| {op}{mark} | {before[op]} | {after[op]} | {after[op] - before[op]:+d} |")
    b, a = sum(before.values()), sum(after.values())
    lines.append(f"| **total** | {b} | {a} | {a - b:+d} |")
    return lines


def rising_lines(forms: dict[str, OnnxForm]) -> list[str]:
    lines = []
    for op in rising(forms):
        names = node_names(forms["folded"].optimized, op)
        more = f" ... (+{len(names) - MAX_NODE_NAMES})" if len(names) > MAX_NODE_NAMES else ""
        lines.append(f"{op} in the folded graph: {', '.join(names[:MAX_NODE_NAMES])}{more}")
    return lines or ["no op type's count rises after folding"]


def agreement_lines(forms: dict[str, OnnxForm], fresh: torch.Tensor) -> list[str]:
    """Assert the two ONNX models agree on ``fresh``; one line per comparison."""
    expected = run_session(forms["unfolded"].session, fresh)
    actual = run_session(forms["folded"].session, fresh)
    assert_close(actual, expected)
    abs_err, rel_err = max_errors(actual, expected)
    lines = [
        f"{form:>8} file vs its PyTorch module (example batch): max rel "
        f"{forms[form].check_rel_error:.3g}"
        for form in FORMS
    ]
    lines.append(f"folded vs unfolded ONNX (fresh input): max abs {abs_err:.3g}, rel {rel_err:.3g}")
    return lines


# --------------------------------------------------------------------------- main


def run_model(spec: str, args: argparse.Namespace, tmp: Path) -> dict[str, OnnxForm]:
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    fresh = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1))
    modules, fold_seconds = build_forms(spec, x, args.seed)
    forms, exporters = {}, set()
    for form in FORMS:
        path = tmp / f"{spec.replace(':', '_')}_{form}.onnx"
        forms[form], exporter = export_form(modules[form], x, path, args.dynamic_batch)
        exporters.add(exporter)
    exported = ", ".join(f"{f} {forms[f].exported_nodes}" for f in FORMS)
    print_section(
        f"{spec}: input {'x'.join(map(str, shape))}",
        [
            f"repfx.fold: {fold_seconds:.1f} s (verification on)",
            f"exporter: {', '.join(sorted(exporters))}; "
            f"{'dynamic' if args.dynamic_batch else 'static'} batch",
            f"nodes as exported: {exported}",
        ],
    )
    print_section(f"{spec}: agreement", agreement_lines(forms, fresh))
    print_section(f"{spec}: nodes after onnxruntime ORT_ENABLE_ALL", table_lines(forms))
    print_section(f"{spec}: op types whose count rises", rising_lines(forms))
    return forms


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shown_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    print_section("machine", [*machine_lines(shown_argv), *version_lines()])
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-nodes-") as tmp:
        for spec in args.models:
            results[spec] = run_model(spec, args, Path(tmp))
    if args.markdown:
        lines = []
        for spec, forms in results.items():
            lines += [*table_markdown(spec, forms), ""]
        print_section("markdown", lines[:-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
