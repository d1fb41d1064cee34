"""What the module ``ExportedProgram.module()`` returns carries into the folded module, made
to speak repfx's errors and to survive ``torch.save`` and ``copy.deepcopy``.

``torch.export`` gives the graph module

* a guards submodule (``_guards_fn``) whose ``forward`` is generated code that asserts the
  shapes and values export fixed (``x.size()[2] == 8``, ``scale == 2.0``): :class:`InputGuards`
  raises a failed check as a :class:`repfx.GuardError`, and keeps the generated function in a
  form ``pickle`` can store (:class:`GuardCode`);
* a pre-hook that checks the call's form (as many positional arguments, the same keywords),
  raising a bare ``ValueError``: :class:`CallFormCheck` raises a :class:`repfx.GuardError`;
* hooks around each call that register module types among the inputs as pytree nodes,
  closures ``pickle`` cannot store: dropped where no input is a module (then they do nothing),
  otherwise :class:`ModuleInputs`;
* ``train`` and ``eval`` overridden to raise ``NotImplementedError``, also closures: both work
  as for any module (they set the flags; the graph computes what the model computed in the
  mode it was captured in).
"""

from __future__ import annotations

import marshal
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import GuardError, one_line

GUARDS_SUBMODULE = "_guards_fn"  # ExportedProgram.module()'s input-shape checks
_EXPORT_CLOSURES = "_create_stateful_graph_module.<locals>"


def adopt_exported_module(gm: fx.GraphModule) -> None:
    """Put repfx's forms of export's guards, hooks and ``train`` / ``eval`` into ``gm``."""
    if hasattr(gm, GUARDS_SUBMODULE):
        setattr(gm, GUARDS_SUBMODULE, InputGuards(GuardCode.of(getattr(gm, GUARDS_SUBMODULE))))
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            gm._forward_pre_hooks[key] = CallFormCheck(hook)
    _picklable_hooks(gm)
    for name in ("train", "eval"):
        vars(gm).pop(name, None)


class GuardCode:
    """Export's generated guard function, callable, that ``pickle`` stores as its code object
    (``marshal``: a file saved with one Python version loads with that version)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self._traced = torch._dynamo.dont_skip_tracing(function)  # dynamo re-reads the guards

    @classmethod
    def of(cls, guards: nn.Module) -> GuardCode | nn.Module:
        """The generated function of export's guards module, or the module itself where its
        ``forward`` is not such a function."""
        forward = vars(guards).get("forward")
        cells = [c.cell_contents for c in getattr(forward, "__closure__", None) or ()]
        generated = [f for f in cells if isinstance(f, types.FunctionType) and f.__name__ == "_"]
        return cls(generated[0]) if generated else guards

    def __call__(self, *args: Any) -> None:
        return self._traced(*args)

    def __getstate__(self) -> dict[str, Any]:
        return {"code": marshal.dumps(self.function.__code__), "python": sys.version_info[:2]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if tuple(state["python"]) != sys.version_info[:2]:
            raise GuardError(
                f"this folded module was saved with Python {'.'.join(map(str, state['python']))}: "
                "its input checks load with that version only. Load it there, or fold the "
                "model again"
            )
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

        namespace = {**SYMPY_INTERP, "math": math, "inf": math.inf, "torch": torch}
        self.__init__(types.FunctionType(marshal.loads(state["code"]), namespace, "_"))


class InputGuards(nn.Module):
    """Export's input checks (``guards``), with a failed check raised as a
    :class:`repfx.GuardError` that names the input and says what to do."""

    def __init__(self, guards: Callable[..., Any]) -> None:
        super().__init__()
        self.guards = guards

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.guards(*args, **kwargs)
        except AssertionError as exc:
            check = str(exc).strip().removeprefix("Guard failed:").strip()
            raise GuardError(
                f"the folded module takes only inputs with {check}: torch.export fixed this "
                "to the example inputs when it captured the model. Fold with example inputs "
                "like those you call it with (the sizes, and any number or flag among them)"
            ) from exc


class CallFormCheck:
    """Export's input-form pre-hook, its ``ValueError`` raised as a :class:`GuardError`."""

    def __init__(self, check: Callable[..., Any]) -> None:
        self.check = check

    def __call__(self, module: nn.Module, *arguments: Any) -> Any:
        try:
            return self.check(module, *arguments)
        except ValueError as exc:
            raise GuardError(
                "the folded module takes its inputs in the form of the example inputs it was "
                "folded with (torch.export fixed the arguments they left out to their defaults, "
                "and the keywords they gave): call it that way, or fold with example inputs "
                f"that include every argument you pass ({one_line(exc)[:200]})"
            ) from exc


def _picklable_hooks(gm: fx.GraphModule) -> None:
    """Export's hooks that register module types among the inputs around each call: dropped
    where there are none, a :class:`ModuleInputs` where there are."""
    for hooks, enter in ((gm._forward_pre_hooks, True), (gm._forward_hooks, False)):
        for key, hook in list(hooks.items()):
            if not getattr(hook, "__qualname__", "").startswith(_EXPORT_CLOSURES):
                continue
            cells = [c.cell_contents for c in hook.__closure__ or ()]
            module_types = next((c for c in cells if isinstance(c, set)), None)
            if module_types is None:
                continue  # (not the hook this knows: left as it is)
            if module_types:
                hooks[key] = ModuleInputs(frozenset(module_types), enter)
            else:
                del hooks[key]
                gm._forward_hooks_always_called.pop(key, None)


@dataclass(frozen=True)
class ModuleInputs:
    """Export's hook that registers (``enter``) or removes the module types among the graph's
    inputs as pytree nodes around a call, as a picklable object."""

    module_types: frozenset[type]
    enter: bool

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        from torch._export import utils

        if self.enter:
            change = utils.register_module_as_pytree_input_node
        else:
            change = utils.deregister_module_as_pytree_input_node
        for module_type in self.module_types:
            change(module_type)
