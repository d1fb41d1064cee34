"""``torch.compile(model, backend="repfx")``: repfx's passes inside the PT2 stack.

Dynamo hands a backend an fx graph whose parameters and buffers arrive as placeholders (their
source names say which: ``L['self']._modules['conv']._parameters['weight']``), with the real
tensors among the example inputs. The backend

1. freezes the ones that are safe to treat as constants — a parameter when grad is disabled or
   it does not require grad, a buffer the graph does not write (training-mode BN updates its
   running statistics: those stay inputs) — by turning their placeholders into attributes;
2. runs the same passes as :func:`repfx.fold` (``repfx.passes.default_pipeline``) on it;
3. hands the folded graph to the inner backend (``"inductor"``, run with its freezing on so
   that it prepacks the folded weights; ``"eager"``; or any backend callable) and returns a
   function with the original calling convention, which drops the frozen arguments.

Like inductor's own freezing, an in-place change to a frozen weight after compiling is not
seen by the compiled code: recompile (``torch._dynamo.reset()``) after changing weights.

Reports: each backend keeps the fold reports of the last ``max_reports`` graphs it compiled
(``DynamoBackend.reports``; for ``backend="repfx"``, :func:`last_reports`), and logs each one
on the ``repfx.dynamo`` logger at INFO level.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .capture import drop_no_op_dtype_guards, functionalize
from .ir.graph import annotate_ranks, forget_annotations
from .passes import default_pipeline, run_to_fixpoint
from .passes.base import Pass, rule_words
from .passes.rewrite import delete_unused_attributes
from .report.fold_report import FoldReport, GraphStats

log = logging.getLogger("repfx.dynamo")

MAX_REPORTS = 32  # reports a backend keeps: one per compiled graph, oldest dropped first

_SOURCE = re.compile(r"\._(parameters|buffers)\['([^']+)'\]")


@dataclass
class DynamoBackend:
    """A dynamo backend (``torch.compile(model, backend=DynamoBackend())``); ``reports`` has one
    :class:`~repfx.report.FoldReport` per graph it compiled, the last ``max_reports`` of
    them."""

    inner: str | Callable = "inductor"
    passes: Callable[[], Sequence[Pass]] = default_pipeline
    max_reports: int = MAX_REPORTS
    reports: deque[FoldReport] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.reports = deque(maxlen=self.max_reports)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        frozen = _freezable(gm, example_inputs)
        report = FoldReport()
        if frozen:
            gm = _copy(gm)  # dynamo reads the graph it handed over (its inputs) afterwards
            _freeze(gm, {i: example_inputs[i] for i in frozen})
            functionalize(gm)  # in-place ops: out of place where provably private, else marked
            _record_shapes(gm)
            drop_no_op_dtype_guards(gm)
            annotate_ranks(gm)
            report.before = GraphStats.of(gm)
            passes = self.passes()
            fixpoint = run_to_fixpoint(gm, passes)
            report.folded, report.skipped = fixpoint.folded, fixpoint.skipped
            report.add_pass_seconds(fixpoint.seconds)
            report.rule_words = rule_words(passes)
            delete_unused_attributes(gm)
            forget_annotations(gm)
            gm.recompile()
            report.after = GraphStats.of(gm)
        else:
            report.notes.append("nothing frozen: parameters need grad, or none in the graph")
        self.reports.append(report)
        log.info("repfx: fold report of a compiled graph\n%s", report)
        remaining = [x for i, x in enumerate(example_inputs) if i not in frozen]
        compiled = _inner_compile(self.inner, gm, remaining)
        if not frozen:
            return compiled
        keep = [i for i in range(len(example_inputs)) if i not in frozen]

        def run(*args: Any) -> Any:
            return compiled(*[args[i] for i in keep])

        return run


def compile_backend(inner: str | Callable = "inductor", **kwargs: Any) -> DynamoBackend:
    """A repfx dynamo backend whose folded graphs run on ``inner``."""
    return DynamoBackend(inner=inner, **kwargs)


# The backend behind ``backend="repfx"``: one per process, so that its reports can be read.
_REGISTERED = DynamoBackend()


def repfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The ``torch_dynamo_backends`` entry point: ``torch.compile(m, backend="repfx")``."""
    return _REGISTERED(gm, example_inputs)


def last_reports() -> list[FoldReport]:
    """The fold reports of the graphs ``backend="repfx"`` compiled most recently, oldest first
    (at most ``MAX_REPORTS``)."""
    return list(_REGISTERED.reports)


def _freezable(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> set[int]:
    """Indices of the placeholders that may be treated as constants."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    frozen = set()
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        kind = _attribute_kind(node)
        if kind is None or not isinstance(value, torch.Tensor) or _written(node):
            continue
        if kind == "parameters" and value.requires_grad and torch.is_grad_enabled():
            continue  # training needs the real parameter in the graph
        frozen.add(i)
    return frozen


def _attribute_kind(node: fx.Node) -> str | None:
    graph_arg = node.meta.get("grapharg")
    source = getattr(getattr(graph_arg, "source", None), "name", None)
    source = source() if callable(source) else source
    match = _SOURCE.search(source or "")
    return match.group(1) if match else None


def _written(node: fx.Node) -> bool:
    """Does the graph (possibly) write to this tensor: an in-place op, or a training-mode
    batch norm updating its running statistics?"""
    for user in node.users:
        name = getattr(user.target, "__name__", str(user.target))
        if name.endswith("_") and not name.endswith("__"):
            return True
        if name == "batch_norm" and _batch_norm_training(user):
            return True
    return False


def _batch_norm_training(node: fx.Node) -> bool:
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
    return training is not False


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _freeze(gm: fx.GraphModule, tensors: dict[int, torch.Tensor]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, value in tensors.items():
        node = placeholders[i]
        name = f"frozen_{node.name}"
        gm.register_buffer(name, value.detach())
        with gm.graph.inserting_after(placeholders[-1]):
            attr = gm.graph.get_attr(name)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.recompile()


def _record_shapes(gm: fx.GraphModule) -> None:
    """Give the passes the shapes dynamo already knows: every node's fake tensor
    (``meta["example_value"]``) as the ``tensor_meta`` shape propagation would record. Nodes
    whose shape is symbolic (dynamic shapes) keep only their inferred rank."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    for node in gm.graph.nodes:
        value = node.meta.get("example_value", node.meta.get("val"))
        static = isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape)
        if static and "tensor_meta" not in node.meta:
            try:
                node.meta["tensor_meta"] = _extract_tensor_metadata(value)
            except Exception:  # a fake tensor the extractor cannot read: ranks only
                continue


def _inner_compile(inner: str | Callable, gm: fx.GraphModule, inputs: list[Any]) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "inductor":
        # Freezing: inductor treats the graph's attributes as constants (prepacked conv
        # weights, folded constant sub-graphs). Every attribute is one repfx froze or made.
        from torch._inductor.compile_fx import compile_fx

        with torch._inductor.config.patch(freezing=True):
            return compile_fx(gm, inputs)
    if isinstance(inner, str):
        from torch._dynamo.backends.registry import lookup_backend

        inner = lookup_backend(inner)
    return inner(gm, inputs)


__all__ = ["MAX_REPORTS", "DynamoBackend", "compile_backend", "last_reports", "repfx_backend"]
