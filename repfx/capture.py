"""Capture: a model → a ``torch.fx.GraphModule`` of repfx's own copy of it.

The user's model is deep-copied first, so tracing side effects (caches, counters, hooks that
run during tracing) land on the copy. A submodule whose ``forward`` cannot be traced
symbolically (data-dependent control flow, unsupported Python) is kept as a single
``call_module`` leaf instead of failing the whole model; the fold then works inside it
separately (see ``repfx.fold``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn


class CaptureError(RuntimeError):
    """The model could not be captured; the message says why and what to do."""


def copy_model(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # e.g. a module holding a lock or an open file
        raise CaptureError(
            f"cannot copy the model ({type(exc).__name__}: {exc}); repfx never folds the "
            "original in place. Make the model deep-copyable (e.g. drop non-tensor handles)."
        ) from exc


class ExampleInputError(ValueError):
    """The model does not run on the example inputs it was given."""


class _FallbackTracer(fx.Tracer):
    """Traces through modules where it can; turns modules it cannot trace into leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.opaque: dict[str, str] = {}

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """As ``fx.Tracer.getattr``, with a name lookup built once instead of a scan of every
        parameter per access (which makes tracing quadratic in model size)."""
        is_tensor = isinstance(attr_val, nn.Parameter) or (
            self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor)
        )
        name = self._tensor_names().get(id(attr_val)) if is_tensor else None
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        """As ``fx.Tracer.create_arg``, with the same O(1) lookup for a module's own tensors
        passed as arguments (``F.batch_norm(x, self.running_mean, ...)``)."""
        if isinstance(a, torch.Tensor) and (name := self._tensor_names().get(id(a))) is not None:
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _tensor_names(self) -> dict[int, str]:
        if getattr(self, "_names_of", (None, None))[0] is not self.root:
            names: dict[int, str] = {}
            for name, t in [*self.root.named_parameters(), *self.root.named_buffers()]:
                names.setdefault(id(t), name)
            self._names_of = (self.root, names)
        return self._names_of[1]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or super().is_leaf_module(m, qualname)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        qualname = self.path_of_module(m)
        if not qualname or self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last_node = next(iter(reversed(self.graph.nodes)), None)
        stack = dict(self.module_stack)  # the current nesting only: small
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            self._rollback(last_node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            # (call counts of the failed partial trace stay: they only name metadata keys)
            self.opaque[qualname] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return super().call_module(m, forward, args, kwargs)

    def _rollback(self, last_node: fx.Node | None) -> None:
        """Erase the nodes the failed partial trace created, newest first."""
        for node in list(reversed(self.graph.nodes)):
            if node is last_node:
                break
            self.graph.erase_node(node)


def capture(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """Trace ``model`` (already repfx's copy). Returns the graph module and the paths of
    modules kept as opaque leaves, with the reason each could not be traced."""
    tracer = _FallbackTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise CaptureError(
            f"cannot trace {type(model).__name__}.forward with torch.fx "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "repfx folds inside submodules that fail to trace, but the top-level forward "
            "itself must be traceable: move data-dependent control flow into a submodule."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return gm, tracer.opaque


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

    Buffers are restored afterwards, so a training-mode BN's running statistics are unchanged.
    """
    saved = {name: b.detach().clone() for name, b in gm.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng():
            _ShapeRecorder(gm).run(*example_inputs)
    except Exception as exc:
        shapes = ", ".join(
            str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
            for x in example_inputs
        )
        cause = exc
        raise ExampleInputError(
            f"the model does not run on the example inputs [{shapes}] "
            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
            "pass inputs of the shape and dtype the model expects"
        ) from exc
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(saved[name])
