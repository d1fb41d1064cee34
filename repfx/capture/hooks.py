"""Forward hooks: which a folded model cannot honour, and what a hook's code may do.

* **Refused.** Global module forward hooks (``register_module_forward_hook`` /
  ``_pre_hook``) observe every module call: the model is refused (:class:`CaptureError`).
  Forward hooks or pre-hooks on the *top-level* model are refused too: ``fx`` traces
  ``forward`` itself, so the folded ``GraphModule`` would not run them — remove the hooks or
  fold a submodule (:func:`refuse_hooks`). A submodule with forward hooks or pre-hooks is kept
  as a leaf (listed among the opaque modules) so that its hooks run, on the values they see in
  the original (``repfx.capture.fx``); ``torch.nn`` leaves with hooks stay leaves as always.
  Backward hooks do not run in inference and state-dict hooks change no value: they are
  ignored.
* **Read.** A hook is code repfx does not run through its passes, so what it may do is read
  from its bytecode (:mod:`.bytecode`), conservatively: :func:`hook_may_write` — only a hook
  that just loads, computes out of place and returns (``lambda m, args, out: out * a + b``) is
  known not to write to a tensor; :func:`hook_reads_module` — only a hook whose code never
  loads its first argument is known not to look at the module it is given.
"""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import nn

from ..errors import CaptureError
from ..ir.graph import global_forward_hooks
from .bytecode import instructions


def forward_hooks_of(module: nn.Module) -> bool:
    """Does ``module`` itself carry forward hooks or pre-hooks (any kind)?"""
    return bool(
        getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None)
    )


def forward_hooks(module: nn.Module) -> list[Any]:
    """The forward hooks and pre-hooks of ``module`` itself."""
    return [
        *getattr(module, "_forward_hooks", {}).values(),
        *getattr(module, "_forward_pre_hooks", {}).values(),
    ]


def refuse_hooks(model: nn.Module) -> None:
    """Raise :class:`CaptureError` for hooks a folded ``GraphModule`` could not honour."""
    found = global_forward_hooks()
    if found:
        raise CaptureError(
            f"{' and '.join(found)} are registered: they observe every module call, and a "
            "folded model calls other modules. Remove them before folding."
        )
    if forward_hooks_of(model):
        raise CaptureError(
            f"{type(model).__name__} has forward hooks or pre-hooks on the top-level model: "
            "torch.fx traces its forward, so the folded GraphModule would not run them: remove "
            "the hooks or fold a submodule."
        )


def hooks_may_write(module: nn.Module) -> bool:
    """May a forward hook or pre-hook of ``module`` write to a tensor?"""
    return any(hook_may_write(hook) for hook in forward_hooks(module))


def hook_may_write(hook: Any) -> bool:
    """May ``hook`` write to a tensor? ``False`` only for a plain function whose code just
    loads, computes out of place and returns."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    code = getattr(hook, "__code__", None)
    if code is None or not isinstance(hook, types.FunctionType):
        return True
    return not all(ins.pure for ins in instructions(code))


def hook_reads_module(hook: Any) -> bool:
    """Does a hook's code read its first argument (the module)? Unknown callables: assume so."""
    bound = 0
    while isinstance(hook, (functools.partial, types.MethodType)):
        if isinstance(hook, types.MethodType):
            bound, hook = bound + 1, hook.__func__
        else:
            bound, hook = bound + len(hook.args), hook.func
    code = getattr(hook, "__code__", None)
    if not isinstance(hook, types.FunctionType) or code is None or code.co_argcount <= bound:
        return True
    module_arg = code.co_varnames[bound]
    return module_arg in code.co_cellvars or any(
        module_arg in ins.loads for ins in instructions(code)
    )
