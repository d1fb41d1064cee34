"""Why a rewrite the proof rejects in a low-precision dtype is a loss of precision, not a bug.

A fold moves constants between ops: a LayerScale of 1e-5 into float16 conv weights of 1e-2
gives entries of 1e-7, below float16's smallest normal number (6.1e-5), where a value keeps
fewer digits than the dtype holds (1e-7 is stored to within 30%). The float64 fold is right;
its float16 copy is not, and the proof rejects it. :func:`precision_loss` says so when the
tensors of the rewritten region hold subnormal entries of a 16-bit float, so that the commit
point reports a refusal with that reason instead of a repfx bug.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx

from ..ir.graph import ConstantFolder
from ..ir.match import Fail
from .region import Region, collect_region


def precision_loss(
    gm: fx.GraphModule, region: Region, replacements: Sequence[fx.Node]
) -> Fail | None:
    """Why the rewritten ``region`` (now computed by ``replacements``) may have lost
    precision in its dtype: its constants and module tensors hold subnormal entries of a
    16-bit float (``None``: not that). (The modules the rewrite changed hold their new
    tensors now, so the original's count is not known: a model that stores subnormal float16
    weights already is rare, and the rewrite is refused either way.)"""
    stops = [n for n in region.inputs if not n._erased]
    rewritten = collect_region(list(replacements), stops, ConstantFolder(gm))
    tensors = [*rewritten.constants.values()]
    for node in rewritten.ops:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            tensors += [*module.parameters(), *module.buffers()]
    low = [t for t in tensors if _floating(t) and torch.finfo(t.dtype).bits <= 16]
    count = subnormal_entries(low)
    if not count:
        return None
    dtypes = ", ".join(sorted({str(t.dtype) for t in low}))
    return Fail(
        f"the folded constants hold {count} entries below the smallest normal number of "
        f"{dtypes}, which keep fewer digits than the dtype holds: the fold would lose "
        "precision in this dtype (a tiny scale, such as a LayerScale of 1e-5, moved into the "
        "weights)"
    )


def subnormal_entries(tensors: Iterable[torch.Tensor]) -> int:
    """How many entries of ``tensors`` are subnormal in their dtype (non-zero, below its
    smallest normal number)."""
    count = 0
    for t in tensors:
        if _floating(t):
            magnitude = t.detach().abs()
            count += int(((magnitude > 0) & (magnitude < torch.finfo(t.dtype).tiny)).sum())
    return count


def _floating(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()
