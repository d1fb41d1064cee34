"""``torch.compile(model, backend="repfx")``: repfx's passes inside the PT2 stack.

Dynamo hands a backend an fx graph whose parameters and buffers arrive as placeholders (their
source names say which: ``L['self']._modules['conv']._parameters['weight']``), with the real
tensors among the example inputs. The backend

1. freezes the ones that are safe to treat as constants — a parameter when grad is disabled or
   it does not require grad, a buffer the graph does not write (training-mode BN updates its
   running statistics: those stay inputs) — by turning their placeholders into attributes.
   With inductor's ``freezing`` set, dynamo hands them over as attributes already: those are
   frozen as they are, under the same conditions;
2. runs the same passes as :func:`repfx.fold` (``repfx.passes.default_pipeline``) on it;
3. hands the folded graph to the inner backend (``"inductor"``, run with its freezing on so
   that it prepacks the folded weights; ``"eager"``; or any backend callable) and returns a
   function with the original calling convention, which drops the frozen arguments.

The fold assumes the frozen tensors keep the values it read. The returned function checks that
on every call — each frozen tensor is still the one the fold read (``is``) and its version
counter has not moved (a handful of integer compares) — and refolds when one changed: a weight
written in place after compiling, an optimizer step, ``load_state_dict``, BN statistics
updated by a training step between two evaluations. The refolded graph is compiled again by
the inner backend when the graph's shapes are static; a graph with symbolic shapes (dynamic
batch) runs refolded without it until ``torch._dynamo.reset()``, since recompiling it needs
dynamo's shape environment. A write through ``tensor.data`` bypasses the version counter and
is not seen: write to the tensor itself (under ``torch.no_grad()``).

Reports: each backend keeps the fold reports of the last ``max_reports`` graphs it compiled
(``DynamoBackend.reports``; for ``backend="repfx"``, :func:`last_reports`), and logs each one
on the ``repfx.dynamo`` logger at INFO level.
"""

from __future__ import annotations

import logging
import operator
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .capture import drop_no_op_dtype_guards, functionalize
from .ir.graph import MUTATED_KEY, annotate_ranks, fetch_attr, forget_annotations
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
        attributes = _frozen_attributes(gm)
        if not frozen and attributes is None:
            report = FoldReport()
            report.notes.append(
                "nothing frozen: the parameters need grad, are written by the graph or are "
                "inference tensors (made under torch.inference_mode(): no version counter to "
                "watch), or there are none in the graph"
            )
            self._keep(report)
            return _inner_compile(self.inner, gm, list(example_inputs))
        return WatchedGraph(self, gm, example_inputs, frozen, attributes or {})

    def fold(
        self, gm: fx.GraphModule, tensors: dict[int, torch.Tensor]
    ) -> tuple[fx.GraphModule, FoldReport]:
        """A folded copy of ``gm`` with the placeholders ``tensors`` holds (by index) frozen to
        those tensors, and its report."""
        gm = _copy(gm)  # dynamo reads the graph it handed over (its inputs) afterwards
        _freeze(gm, tensors)
        _name_modules_as_the_model_does(gm)
        functionalize(gm)  # in-place ops: out of place where provably private, else marked
        _record_shapes(gm)
        drop_no_op_dtype_guards(gm)
        annotate_ranks(gm)
        report = FoldReport()
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
        return gm, report

    def _keep(self, report: FoldReport) -> None:
        self.reports.append(report)
        log.info("repfx: fold report of a compiled graph\n%s", report)


class WatchedGraph:
    """A folded, compiled graph and the frozen tensors its fold read. A call first checks that
    each one is still the tensor the fold read, with the same version counter — and, for the
    running statistics a batch norm reads, the same values (a training-mode batch norm kernel
    updates them without moving the counter) — and refolds from the graph dynamo handed over
    when one is not (see the module's docstring)."""

    def __init__(
        self,
        backend: DynamoBackend,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        frozen: set[int],
        attributes: dict[str, torch.Tensor],
    ) -> None:
        self._backend = backend
        self._source = _copy(gm)  # the graph as dynamo handed it over, to refold from
        self._frozen = sorted(frozen)
        self._keep = [i for i in range(len(example_inputs)) if i not in frozen]
        self._labels = _frozen_labels(gm, frozen)
        self._attributes = attributes
        self._statistics = _running_statistics(gm)
        self._static = _static_shapes(gm)
        self._compiled = self._build(example_inputs, refold=None)

    def __call__(self, *args: Any) -> Any:
        changed = self._watch.changed(args)
        if changed is not None:
            # (the refold runs in the caller's call: its proofs evaluate random ops too, and
            # the call must draw what the model would)
            with torch.random.fork_rng():
                self._compiled = self._build(args, refold=changed)
        return self._compiled(*[args[i] for i in self._keep])

    def _build(self, inputs: Sequence[Any], refold: str | None) -> Callable:
        """Fold with the frozen tensors ``inputs`` holds and the attributes as they are now,
        watch them, and compile; ``refold``: the tensor whose change asked for it (``None``:
        the first fold)."""
        gm, report = self._backend.fold(self._source, {i: inputs[i] for i in self._frozen})
        self._watch = _Watch(
            inputs=[(i, inputs[i], self._labels[i]) for i in self._frozen],
            attributes=[(t, name) for name, t in self._attributes.items()],
            statistics=self._statistics,
        )
        inner = self._backend.inner
        if refold is not None:
            report.notes.append(f"refolded: {refold} changed after the graph was compiled")
            log.info("repfx: %s changed after compiling; refolding its graph", refold)
        self._backend._keep(report)
        if refold is not None and not self._static and inner != "eager":
            report.notes.append(
                f"the refolded graph runs without {inner}: its shapes are symbolic "
                "(torch._dynamo.reset() compiles it again)"
            )
            return gm.forward
        return _inner_compile(inner, gm, [inputs[i] for i in self._keep])


class _Watch:
    """The frozen tensors one fold read, and the test every call runs that they still hold what
    it read: each frozen input is the same tensor object, each frozen tensor has the same
    version counter, and the running statistics a batch norm reads have the same bits (a
    training-mode batch norm kernel writes them without moving their counter). A call pays a
    list comprehension per test and one concatenation of the statistics per dtype and device;
    only a change is looked at tensor by tensor, to name it."""

    def __init__(
        self,
        inputs: list[tuple[int, torch.Tensor, str]],
        attributes: list[tuple[torch.Tensor, str]],
        statistics: set[int | str],
    ) -> None:
        self._positions = [i for i, _, _ in inputs]
        self._inputs = [t for _, t, _ in inputs]
        self._tensors = self._inputs + [t for t, _ in attributes]
        self._labels = [label for _, _, label in inputs] + [name for _, name in attributes]
        self._versions = [t._version for t in self._tensors]
        keys = self._positions + [name for _, name in attributes]
        read_by_norms = [
            (t, label)
            for t, key, label in zip(self._tensors, keys, self._labels, strict=True)
            if key in statistics
        ]
        kinds = dict.fromkeys((t.dtype, t.device) for t, _ in read_by_norms)  # (in order)
        self._statistics = [
            _Snapshot([(t, label) for t, label in read_by_norms if (t.dtype, t.device) == kind])
            for kind in kinds
        ]

    def changed(self, args: Sequence[Any]) -> str | None:
        """The first frozen tensor that no longer holds what the fold read, or ``None``."""
        current = [args[i] for i in self._positions]
        if any(map(operator.is_not, current, self._inputs)):
            return self._first(map(operator.is_not, current, self._inputs))
        versions = [t._version for t in self._tensors]
        if versions != self._versions:
            return self._first(map(operator.ne, versions, self._versions))
        for snapshot in self._statistics:
            if (label := snapshot.changed()) is not None:
                return label
        return None

    def _first(self, differs: Iterable[bool]) -> str:
        return next(label for label, d in zip(self._labels, differs, strict=False) if d)


class _Snapshot:
    """The bits of some tensors of one dtype and device, kept as one flat tensor (NaN equals
    itself)."""

    def __init__(self, tensors: list[tuple[torch.Tensor, str]]) -> None:
        self._tensors = [t for t, _ in tensors]
        self._labels = [label for _, label in tensors]
        self._bits = self._now()  # (a concatenation: a copy of its own)

    def _now(self) -> torch.Tensor:
        with torch.no_grad():  # (one C++ call: a concatenation of the flattened tensors)
            flat = torch._utils._flatten_dense_tensors(self._tensors)
        if flat.is_floating_point() and flat.element_size() in _SAME_SIZE_INTEGER:
            return flat.view(_SAME_SIZE_INTEGER[flat.element_size()])
        return flat

    def changed(self) -> str | None:
        """The first of the tensors whose bits moved, or ``None``."""
        if torch.equal(self._now(), self._bits):
            return None
        start = 0
        for tensor, label in zip(self._tensors, self._labels, strict=True):
            size = tensor.numel()
            now = _Snapshot([(tensor, label)])._bits
            if not torch.equal(now, self._bits[start : start + size]):
                return label
            start += size
        return self._labels[0]  # (a tensor changed its size)


_SAME_SIZE_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    written = _written_placeholders(gm)
    frozen = set()
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        kind = _attribute_kind(node)
        if kind is None or not isinstance(value, torch.Tensor) or _written(node) or i in written:
            continue
        if value.is_inference():
            continue  # no version counter: a change could not be seen
        if kind == "parameters" and value.requires_grad and torch.is_grad_enabled():
            continue  # training needs the real parameter in the graph
        frozen.add(i)
    return frozen


def _frozen_attributes(gm: fx.GraphModule) -> dict[str, torch.Tensor] | None:
    """The tensors dynamo handed over as attributes (inductor's ``freezing`` set), by target,
    when all of them may be treated as constants (none written by the graph, none a parameter
    that needs grad while grad is enabled); ``None``: there are none, or not all may."""
    found: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        value = fetch_attr(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(value, torch.Tensor):
            continue
        needs_grad = value.requires_grad and torch.is_grad_enabled()
        if _written(node) or needs_grad or value.is_inference():
            return None
        found[node.target] = value
    return found or None


def _frozen_labels(gm: fx.GraphModule, frozen: set[int]) -> dict[int, str]:
    """What to call each frozen placeholder in a report: its source (``L['self'].conv.weight``
    as the module path ``conv.weight``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    labels = {}
    for i in frozen:
        source = _source_name(placeholders[i]) or placeholders[i].name
        labels[i] = module_path(source)
    return labels


def module_path(source: str) -> str:
    """Dynamo's name of a module or tensor as the model's own dotted path:
    ``L['self']._modules['conv']._parameters['weight']`` and ``L['self'].conv.weight`` both
    read ``conv.weight``."""
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", source)
    return path.removeprefix("L['self'].").removeprefix("L['self']")


def _name_modules_as_the_model_does(gm: fx.GraphModule) -> None:
    """Module paths in each node's ``nn_module_stack`` as the model's own (``network.0.norm1``,
    not ``L['self'].network.0.norm1``), so that reports name them as ``repfx.fold`` does."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (module_path(path), *rest) for key, (path, *rest) in stack.items()
            }


_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training"}


def _running_statistics(gm: fx.GraphModule) -> set[int | str]:
    """The buffers a batch norm of the graph reads, its running statistics: placeholders by
    index, attributes by target."""
    found: set[int | str] = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if not {getattr(u.target, "__name__", str(u.target)) for u in node.users} & _BATCH_NORMS:
            continue
        if node.op == "placeholder" and _attribute_kind(node) == "buffers":
            found.add(placeholders.index(node))
        elif node.op == "get_attr" and not isinstance(fetch_attr(gm, node.target), nn.Parameter):
            found.add(node.target)
    return found


def _static_shapes(gm: fx.GraphModule) -> bool:
    """Are all the graph's input shapes static (no symbolic size dynamo made dynamic)?"""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and not all(isinstance(d, int) for d in value.shape)
        ):
            return False
    return True


def _source_name(node: fx.Node) -> str | None:
    graph_arg = node.meta.get("grapharg")
    source = getattr(getattr(graph_arg, "source", None), "name", None)
    return source() if callable(source) else source


def _attribute_kind(node: fx.Node) -> str | None:
    match = _SOURCE.search(_source_name(node) or "")
    return match.group(1) if match else None


def _written_placeholders(gm: fx.GraphModule) -> set[int]:
    """The placeholders (by index) capture's in-place analysis finds the graph may write to,
    through views too (``p[:2] += 1``, ``p.data.mul_(2)``)."""
    probe = _copy(gm)
    functionalize(probe)
    placeholders = [n for n in probe.graph.nodes if n.op == "placeholder"]
    return {i for i, n in enumerate(placeholders) if n.meta.get(MUTATED_KEY)}


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
    """Each placeholder of ``tensors`` becomes an attribute holding its tensor: a frozen
    parameter where the model holds a parameter (so that reports count it as one), else a
    buffer."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, value in tensors.items():
        node = placeholders[i]
        name = f"frozen_{node.name}"
        if _attribute_kind(node) == "parameters":
            gm.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
        else:
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


__all__ = [
    "MAX_REPORTS",
    "DynamoBackend",
    "WatchedGraph",
    "compile_backend",
    "last_reports",
    "repfx_backend",
]
