"""A module's tensor state, saved by value and put back: capture runs the model (tracing it,
recording the inputs its children receive), and a forward that writes its own tensors
(``self.count += 1``, ``self.bn.running_mean[:2] += 1``, ``self.stats.add_(x.mean())``) must
not leave repfx's copy a step ahead of the model it came from."""

from __future__ import annotations

import torch
from torch import nn


def tensor_attributes(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Plain tensor attributes of any module of ``model`` (neither parameters nor buffers):
    torch.fx does not trace them and torch.export lifts them as constants, real tensors a
    capture may write to."""
    return [(qualified, vars(module)[name]) for module, name, qualified in _plain_slots(model)]


def _plain_slots(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute name, qualified name) of each plain tensor attribute."""
    return [
        (module, name, f"{path}.{name}" if path else name)
        for path, module in model.named_modules()
        for name, value in vars(module).items()
        if _plain(value)
    ]


def unrecorded_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a torch.fx trace may write to without recording it: plain tensor attributes
    (first, so that a write through one names it) and buffers (unless traced as graph
    values)."""
    return [*tensor_attributes(model), *model.named_buffers()]


def module_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a run of ``model`` may write to: its parameters too."""
    return [*unrecorded_tensors(model), *model.named_parameters()]


class SavedState:
    """Copies of ``tensors`` (name, tensor) as they are now; :meth:`restore` puts back the
    values of those that changed."""

    def __init__(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self._saved = [(name, t, t.detach().clone()) for name, t in tensors]

    def restore(self) -> list[str]:
        """Put back every tensor whose value changed; the names of those that had, in order."""
        changed = []
        with torch.no_grad():
            for name, tensor, before in self._saved:
                if not torch.equal(tensor, before):
                    tensor.copy_(before)
                    changed.append(name)
        return changed


class Bindings:
    """Which tensor each buffer and plain tensor attribute of ``model`` is bound to now. A
    forward that assigns to one (``self.n = self.n + 1``, or ``self.n += 1``, which rebinds
    the name to what ``__iadd__`` returned) leaves, after a trace, a proxy or a new tensor in
    its place: :meth:`rebound` says which, and puts the tensors back."""

    def __init__(self, model: nn.Module) -> None:
        buffers = [
            (module, name, f"{path}.{name}" if path else name)
            for path, module in model.named_modules()
            for name in module._buffers
        ]
        self._bound = [
            (module, name, qualified, getattr(module, name))
            for module, name, qualified in [*buffers, *_plain_slots(model)]
        ]

    def rebound(self) -> list[tuple[str, object]]:
        """Bind every name back to its tensor; the (name, value it held) of those rebound."""
        changed = []
        for module, name, qualified, value in self._bound:
            now = module._buffers.get(name) if name in module._buffers else vars(module)[name]
            if now is not value:
                changed.append((qualified, now))
                if name in module._buffers:
                    module._buffers[name] = value
                else:
                    vars(module)[name] = value
        return changed


def _plain(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
