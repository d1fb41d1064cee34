"""Example inputs and private copies: the forms users pass inputs in, and running a model on them.

``as_inputs`` turns a tensor, a tuple or a list into the tuple of positional inputs;
``cloned`` copies every tensor (also inside lists, tuples and dicts) so that a model writing its
input cannot change what the caller, or the next run, sees; ``run`` calls a model on clones,
seeded and without grad, as every comparison in repfx does; ``copy_model`` is the private deep
copy that every fold, capture and comparison works on, so the user's model is never touched.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import CaptureError, one_line


def as_inputs(example_inputs: object) -> tuple | None:
    """The positional inputs: ``(x,)`` for a tensor, the items of a tuple or list, ``None``
    for ``None``; a ``TypeError`` naming the type for anything else."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of the model's positional inputs, "
        f"not {type(example_inputs).__name__}"
    )


def cloned(inputs: tuple) -> tuple:
    """``inputs`` with every tensor detached and copied."""
    return tuple(
        tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, a)
        for a in inputs
    )


def run(module: nn.Module, inputs: tuple) -> object:
    """``module(*inputs)`` on clones of the inputs, without grad, with the random generator
    seeded (0) and restored afterwards."""
    args = cloned(inputs)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        return module(*args)


def copy_model(model: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """A deep copy of ``model`` (:class:`CaptureError` naming why if it cannot be copied);
    ``memo`` as ``copy.deepcopy`` takes it (objects already copied, by ``id``)."""
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # e.g. a module holding a lock or an open file
        raise CaptureError(
            f"cannot copy the model ({one_line(exc)}); repfx never folds the "
            "original in place. Make the model deep-copyable (e.g. drop non-tensor handles)."
        ) from exc
