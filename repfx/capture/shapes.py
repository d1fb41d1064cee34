"""Shape propagation: every node's shape and dtype, recorded by running the graph once.

:func:`propagate_shapes` runs the captured graph on the example inputs and stores each tensor
result's shape / dtype in ``node.meta["tensor_meta"]``; buffers, parameters the graph writes
and the example inputs are left as they were, and a model that does not run on the inputs is an
:class:`repfx.errors.ExampleInputError`. With the dtypes known, :func:`drop_no_op_dtype_guards`
drops the casts back that :func:`repfx.capture.functionalize` put after an out-of-place rewrite
whose operand could have promoted the dtype (``a.add_(b)`` → ``(a + b).type_as(a)``) where the
cast changes nothing: the fold is then exact for inputs of the example inputs' dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ..errors import ExampleInputError, one_line
from ..ir.graph import MUTATED_KEY, VALUE_KEYS, dtype_on_meta_tensors, fetch_attr, known_dtype
from .inplace import DTYPE_GUARD_KEY


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each tensor result's shape / dtype in ``tensor_meta``."""

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's shape / dtype in ``node.meta["tensor_meta"]`` by running ``gm``.

    Buffers are restored afterwards, so a training-mode BN's running statistics are unchanged;
    so are the example inputs (an in-place op of the model may write to them).
    """
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise ExampleInputError(
            f"{len(example_inputs)} example inputs for a forward that takes "
            f"{len(placeholders)} ({', '.join(placeholders)}): pass one per input"
        )
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    written = _written_parameters(gm)
    inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        with torch.no_grad(), torch.random.fork_rng():
            _ShapeRecorder(gm).run(*inputs)
    except Exception as exc:
        shapes = ", ".join(
            str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
            for x in example_inputs
        )
        cause = exc
        raise ExampleInputError(
            f"the model does not run on the example inputs [{shapes}] "
            f"({one_line(cause)}); "
            "pass inputs of the shape and dtype the model expects"
        ) from exc
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
            for tensor, value in written:
                tensor.copy_(value)
    drop_no_op_dtype_guards(gm)


def _written_parameters(gm: fx.GraphModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The parameters an in-place op of the graph may write to, with a copy of their value."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.meta.get(MUTATED_KEY):
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen[id(value)] = (value, value.detach().clone())
    return list(seen.values())


def drop_no_op_dtype_guards(gm: fx.GraphModule) -> None:
    """Drop the casts :func:`functionalize` put after an out-of-place op whose tensor operand
    could have promoted it (``a.add_(b)`` → ``(a + b).type_as(a)``) where the recorded dtypes
    show the cast changes nothing. Dtypes follow from the input dtypes alone, so the fold is
    exact for inputs of the example inputs' dtypes (the ones it is verified on)."""
    dropped = False
    for node in list(gm.graph.nodes):
        if not node.meta.get(DTYPE_GUARD_KEY):
            continue
        source = node.args[0]
        before = known_dtype(source) or dtype_on_meta_tensors(source)
        after = known_dtype(node)
        if before is not None and before == after:
            for key in VALUE_KEYS:  # the cast changed nothing: its value is the source's
                if key in node.meta:
                    source.meta.setdefault(key, node.meta[key])
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            dropped = True
    if dropped:
        gm.graph.lint()
        gm.recompile()
