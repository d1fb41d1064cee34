"""A light description of a graph, kept by the report so that a fold can be drawn later.

A :class:`GraphSketch` holds, for each call of a graph (every call the report counts as an op:
all but rank guards), its name, what it computes in a word (a module's class, or a function /
method name) and in a short phrase for people (``conv 3×3, 48→48``), the module it belongs to,
where the passes' fold records name it (``repfx.ir.graph.where``), the values it reads, and
whether it computes a tensor from the model's inputs (:data:`TENSOR`), reads or checks only
shapes (:data:`SHAPE`: ``x.shape``, ``x.ndim == 4``, ``torch._assert``), or reads parameters
only (:data:`CONSTANT`). That is enough to draw any block of the graph before and after a fold
(``repfx.report.draw``) and to count its ops as the report does, and nothing heavy (no tensors,
no reference to the graph itself). ``repfx.fold`` takes one of the graph as captured and one as
folded and stores both in the :class:`~repfx.report.fold_report.FoldReport`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ..ir.graph import arg_of, fetch_attr, is_guard, op_name, where

TENSOR = "tensor"  # computes a tensor from the model's inputs: the dataflow a picture shows
SHAPE = "shape"  # reads or checks shapes only (x.shape, x.size(1), x.ndim == 4, _assert)
CONSTANT = "constant"  # reads parameters and constants only (a LayerScale's unsqueeze)

# What reads only a tensor's metadata, never its values.
_METADATA_ATTRIBUTES = frozenset(
    {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
)
_METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous"}
)
# The modules of Python's scalar functions (``operator.eq``, ``getattr``, ``math.prod``): applied
# to sizes, they compute sizes.
_SCALAR_MODULES = frozenset({"_operator", "operator", "builtins", "math"})
_CHECK_PREFIXES = ("_assert", "_check", "sym_constrain")  # torch._assert, aten._assert_scalar, …
_CONV_FUNCTIONS = frozenset(
    {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
    | {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
)
_LINEAR_FUNCTIONS = frozenset({"linear"})


@dataclass(frozen=True)
class SketchNode:
    name: str
    label: str  # what it computes, in a word: a module's class, or a function / method name
    path: str  # the module it belongs to ("" at the top level)
    inputs: tuple[str, ...]  # the calls and graph inputs it reads
    is_module: bool = False  # a module call: ``path`` is that module's own
    description: str = ""  # what it computes, for people: "conv 3×3, 48→48", "mul layer_scale_1"
    location: str = ""  # how fold records name it (repfx.ir.graph.where): "a.b", "a.b:mul_1"
    computes: str = TENSOR  # TENSOR, SHAPE or CONSTANT


@dataclass(frozen=True)
class GraphSketch:
    """The call nodes of a graph: enough to draw any block of it, nothing heavy."""

    nodes: tuple[SketchNode, ...]

    @staticmethod
    def of(gm: fx.GraphModule) -> GraphSketch:
        calls = [n for n in gm.graph.nodes if n.op.startswith("call_") and not is_guard(n)]
        computes = _what_each_computes(gm)
        paths = _module_paths(calls)
        nodes = tuple(
            SketchNode(
                n.name,
                op_name(gm, n),
                paths[n],
                tuple(i.name for i in n.all_input_nodes if i in paths or i.op == "placeholder"),
                n.op == "call_module",
                _description(gm, n, computes),
                where(n),
                computes[n],
            )
            for n in calls
        )
        return GraphSketch(nodes)

    def block(self, prefix: str) -> list[SketchNode]:
        """The nodes that belong to module ``prefix`` or to a module inside it."""
        return [n for n in self.nodes if in_module(n.path, prefix)]


def in_module(path: str, prefix: str) -> bool:
    """Is module ``path`` the module ``prefix`` or inside it (``""``: the whole model)?"""
    return not prefix or path == prefix or path.startswith(prefix + ".")


# --------------------------------------------------------------------------- what it computes


def _what_each_computes(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """:data:`TENSOR`, :data:`SHAPE` or :data:`CONSTANT` for each node, in graph order: a value
    that depends on no input is a constant; one that reads only metadata of its inputs, checks
    them, or does scalar arithmetic on such reads is a shape; anything else a tensor."""
    computes: dict[fx.Node, str] = {}
    for n in gm.graph.nodes:
        read = [computes[i] for i in n.all_input_nodes if i in computes]
        if n.op == "placeholder":
            computes[n] = TENSOR
        elif n.op == "get_attr" or not read or all(r == CONSTANT for r in read):
            computes[n] = CONSTANT
        elif _reads_metadata(n) or _is_check(n) or _scalar_of_shapes(n, computes):
            computes[n] = SHAPE
        else:
            computes[n] = TENSOR
    return computes


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and _function_name(node).startswith("sym_size")


def _is_check(node: fx.Node) -> bool:
    return node.op == "call_function" and _function_name(node).startswith(_CHECK_PREFIXES)


def _scalar_of_shapes(node: fx.Node, computes: dict[fx.Node, str]) -> bool:
    """Scalar arithmetic (``operator``, builtins) or a method call on shapes only."""
    read = [computes[i] for i in node.all_input_nodes if i in computes]
    if SHAPE not in read or TENSOR in read:
        return False
    if node.op == "call_method":
        return True
    return getattr(node.target, "__module__", None) in _SCALAR_MODULES


def _function_name(node: fx.Node) -> str:
    """A function's name without its overload (``aten.convolution.default`` → ``convolution``)."""
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


# --------------------------------------------------------------------------- words for people


def _description(gm: fx.GraphModule, node: fx.Node, computes: dict[fx.Node, str]) -> str:
    """What ``node`` computes in a short phrase: a conv's kernel and channels, a linear's
    features, a norm's class, or a function's name with the parameter it reads."""
    if node.op == "call_module":
        return _module_words(gm.get_submodule(node.target))
    name = _function_name(node) if node.op == "call_function" else str(node.target)
    attribute = _parameter_operand(node, computes)
    if attribute is None:
        return name
    shape = tuple(getattr(fetch_attr(gm, attribute.target), "shape", ()))
    if name in _CONV_FUNCTIONS and len(shape) >= 3:
        return _functional_conv_words(node, name, shape)
    if name in _LINEAR_FUNCTIONS and len(shape) == 2:
        return f"linear {shape[1]}→{shape[0]}"
    if "norm" in name and len(shape) == 1:
        return f"{name} {shape[0]}"
    return f"{name} {str(attribute.target).rsplit('.', 1)[-1]}"


def _module_words(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        words = _conv_words(
            module.kernel_size, module.in_channels, module.out_channels, module.groups
        )
        if set(module.stride) != {1}:  # "stride 2", or "stride 2×1" when it differs by axis
            words += f", stride {_sizes(module.stride)}"
        return f"transposed {words}" if module.transposed else words
    if isinstance(module, nn.Linear):
        return f"linear {module.in_features}→{module.out_features}"
    return type(module).__name__


def _conv_words(kernel: tuple, inputs: int, outputs: int, groups: int) -> str:
    """``conv 3×3, 48→48``; ``depthwise conv 3×3, 48`` (one group per channel)."""
    size = "×".join(str(k) for k in kernel)  # a kernel's every size, even when alike
    if groups > 1 and groups == inputs == outputs:
        return f"depthwise conv {size}, {outputs}"
    grouped = f", {groups} groups" if groups > 1 else ""
    return f"conv {size}, {inputs}→{outputs}{grouped}"


def _sizes(sizes: tuple) -> str:
    """``2`` for ``(2, 2)``, ``2×1`` for ``(2, 1)``."""
    return str(sizes[0]) if len(set(sizes)) == 1 else "×".join(str(s) for s in sizes)


def _functional_conv_words(node: fx.Node, name: str, weight: tuple[int, ...]) -> str:
    """A functional conv's words from its weight's shape: ``(out, in / groups, *kernel)``, or
    ``(in, out / groups, *kernel)`` transposed. The groups are ``F.conv2d``'s argument 6 (and
    ``F.conv_transpose2d``'s), ``aten.convolution``'s 8, after its ``transposed`` flag (6)."""
    aten = name in ("convolution", "_convolution")
    groups = arg_of(node, 8 if aten else 6, "groups", 1)
    groups = groups if isinstance(groups, int) and groups > 0 else 1
    if name.startswith("conv_transpose") or (aten and arg_of(node, 6, "transposed", False)):
        return "transposed " + _conv_words(weight[2:], weight[0], weight[1] * groups, groups)
    return _conv_words(weight[2:], weight[1] * groups, weight[0], groups)


def _parameter_operand(node: fx.Node, computes: dict[fx.Node, str]) -> fx.Node | None:
    """The ``get_attr`` behind the first operand of ``node`` that reads parameters only (through
    views such as ``unsqueeze``), if ``node`` reads one."""
    for operand in node.all_input_nodes:
        while computes.get(operand) == CONSTANT and operand.op != "get_attr":
            if not operand.all_input_nodes:
                break
            operand = operand.all_input_nodes[0]
        if operand.op == "get_attr":
            return operand
    return None


# --------------------------------------------------------------------------- where it belongs


def _module_paths(calls: list[fx.Node]) -> dict[fx.Node, str]:
    """The module each call belongs to; a call a pass created has none of its own and takes a
    reader's (else an input's)."""
    own = {n: _own_path(n) for n in calls}
    paths = {}
    for n in calls:
        near = [m for m in [*n.users, *n.all_input_nodes] if own.get(m)]
        paths[n] = own[n] if own[n] is not None else (own[near[0]] if near else "")
    return paths


def _own_path(node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None
