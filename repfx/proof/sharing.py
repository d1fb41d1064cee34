"""Copies that share the parameters they do not change.

A fold changes few of a model's tensors (a conv's weight and bias where a BatchNorm folds into
it; nothing at all in a model with nothing to fold), yet repfx works on a private copy of the
model, and copying every weight costs as much memory as the model and about as much time as a
forward pass. :func:`share_parameters` copies the module tree, buffers and other state as
``copy.deepcopy`` does, but gives each parameter a new ``nn.Parameter`` over the *same
storage*: no weight is copied.

That copy must then never write to a shared storage. repfx itself never writes a parameter in
place (a rewrite installs a new tensor: ``repfx.passes.rewrite.set_slot``); the model's own code
may, when it runs — an in-place op on a parameter that capture records, or anything at all in a
module capture could not trace. Before such code runs, :meth:`SharedParameters.release` gives the
parameters it may write storage of their own (copy on write, decided ahead of the write). A
folded module handed back to the user is released entirely: it never aliases the user's
model, which stays untouched whatever is done to either afterwards.

Where repfx only *runs* a model (verification runs the original to compare against), it cannot
know ahead what the forward writes; :func:`run_sharing` runs it on such a copy with every write
to a shared storage stopped *before* it happens (a dispatch mode that sees each ATen op's
written arguments), and runs it again on a full copy when one is attempted (a forward that
updates its own weights in place).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..ir.graph import keys_of, storage_key, written_values
from .inputs import copy_model, run
from .pure import runs_without_writes


class SharedParameters:
    """The parameter storages of a model that a copy of it shares (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self._storages = keys_of(model.parameters())

    def shares(self, tensor: torch.Tensor) -> bool:
        """Does ``tensor`` live in a storage of the model's parameters?"""
        key = storage_key(tensor)
        return key is not None and key in self._storages

    def release(self, root: nn.Module, only: Iterable[torch.Tensor] | None = None) -> int:
        """Give every parameter, buffer and plain tensor attribute of ``root``'s module tree
        that shares a storage with the model (of those in ``only``, when given) a copy of its
        own, in place in the tree: tied tensors stay tied. Returns how many were copied."""
        wanted = None if only is None else {id(t) for t in only}
        copies: dict[int, torch.Tensor] = {}
        for module in root.modules():
            for slots in (module._parameters, module._buffers, vars(module)):
                for name, tensor in slots.items():
                    if not isinstance(tensor, torch.Tensor):
                        continue
                    if wanted is not None and id(tensor) not in wanted:
                        continue
                    if id(tensor) not in copies and self.shares(tensor):
                        copies[id(tensor)] = _own_copy(tensor)
                    if id(tensor) in copies:
                        slots[name] = copies[id(tensor)]
        return len(copies)


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    value = tensor.detach().clone()
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(value, requires_grad=tensor.requires_grad)
    return value


def share_parameters(model: nn.Module) -> tuple[nn.Module, SharedParameters]:
    """A deep copy of ``model`` whose parameters share storage with the model's (each a new
    ``nn.Parameter`` object, so that replacing or converting one in the copy leaves the model's
    alone), and the record of what it shares. Parameters of a ``nn.Parameter`` subclass are
    copied as ``copy.deepcopy`` copies them. :class:`CaptureError` naming why if the model
    cannot be copied."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        if type(p) is nn.Parameter:
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return copy_model(model, memo), SharedParameters(model)


def run_sharing(model: nn.Module, inputs: tuple, calls: int = 1) -> list[object]:
    """The outputs of ``calls`` calls (``run``, ``repfx.proof.inputs``: each seeded alike) of one
    copy of ``model`` that shares its parameters' storage, so that running it copies no weight;
    if the forward is about to write a parameter in place, it is stopped before the write and
    the calls are made on a full copy instead (see the module docstring). ``model`` is never
    touched."""
    if runs_without_writes(model):  # (repfx's own folded graph: nothing to copy)
        return [run(model, inputs) for _ in range(calls)]
    copied, shared = share_parameters(model)
    try:
        with _StopWritesTo(shared):
            return [run(copied, inputs) for _ in range(calls)]
    except _SharedWrite:
        copied = copy_model(model)
        return [run(copied, inputs) for _ in range(calls)]


class _SharedWrite(BaseException):
    """An op was about to write a shared storage (a ``BaseException``: a forward's own
    ``except Exception`` must not swallow it and go on without the write)."""


class _StopWritesTo(TorchDispatchMode):
    """Raises :class:`_SharedWrite` before an ATen op writes (per its schema: in-place ops,
    ``out=`` arguments) a storage ``shared`` holds."""

    def __init__(self, shared: SharedParameters) -> None:
        super().__init__()
        self.shared = shared

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(self.shared.shares(t) for t in tree_leaves(written_values(func, args, kwargs))):
            raise _SharedWrite(func.name())
        return func(*args, **kwargs)
