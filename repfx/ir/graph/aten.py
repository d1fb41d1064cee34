"""What an ATen op does, read off the op itself: whether it draws random numbers, and which of
its arguments its schema marks written (``Tensor(a!) self``, an ``out=`` tensor). Dispatch
modes (capture's record of eager reads, the commit point's refusal of random regions, constant
folding, runs sharing parameters) and the graph's write analysis ask these."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch


def draws_random(func: torch._ops.OpOverload) -> bool:
    """Does ``func`` draw from a random generator (``randn``, ``bernoulli``, ``normal_``)?"""
    return torch.Tag.nondeterministic_seeded in func.tags


@functools.cache
def written_positions(func: torch._ops.OpOverload) -> tuple[int, ...]:
    """The positions, in ``func``'s schema, of the arguments it writes (read once per op: a
    dispatch mode asks for every op it sees, and reading a schema costs about 15 µs)."""
    arguments = func._schema.arguments
    return tuple(i for i, a in enumerate(arguments) if a.alias_info and a.alias_info.is_write)


def argument_value(
    func: torch._ops.OpOverload, index: int, args: Sequence[Any], kwargs: dict[str, Any]
) -> Any:
    """The value a call passes for ``func``'s schema argument ``index`` (positional or by
    name; ``None`` when it is left out)."""
    if index < len(args):
        return args[index]
    return kwargs.get(func._schema.arguments[index].name)


def written_values(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> list[Any]:
    """The values a call of ``func`` passes for the arguments it writes."""
    return [argument_value(func, i, args, kwargs) for i in written_positions(func)]
