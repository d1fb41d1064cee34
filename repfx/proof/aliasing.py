"""Memory of its own for what is handed to unknown code.

Capture hands a private tensor to code repfx does not know (an opaque leaf, a user function)
when that code is its last reader (:data:`repfx.ir.graph.HANDED_KEY`): the code may write to
it, and nobody else would see the write. A rewrite may replace such a tensor, but only by a
value that shares memory with nothing else: were the replacement a region input (``y * 1``
becoming ``y``), a stored tensor, or a value read elsewhere too, the write would reach that
value. :func:`aliasing_failure` checks each replacement on a probe, by storage, after the
rewrite; the commit point refuses the rewrite (a refusal, not a bug) when one is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ..ir.graph import HANDED_KEY, ConstantFolder, fetch_attr
from ..ir.match import Fail
from .region import Region, collect_region
from .validate import Probe, evaluate


def aliasing_failure(
    gm: fx.GraphModule, region: Region, probe: Probe, replacements: Sequence[fx.Node]
) -> Fail | None:
    """Why a replacement of a handed output of ``region`` would share memory with another
    value (``None``: each computes into memory of its own on ``probe``)."""
    handed = [
        (old, new)
        for old, new in zip(region.outputs, replacements, strict=True)
        if old.meta.get(HANDED_KEY)
    ]
    if not handed:
        return None
    feeds = _in_model_dtypes(probe)  # (the module's tensors are used as they are)
    stops = [n for n in region.inputs if not n._erased]
    new_region = collect_region([new for _, new in handed], stops, ConstantFolder(gm))
    values = evaluate(gm, new_region, feeds, lambda value: value)
    taken = _storages([*feeds.values(), *gm.parameters(), *gm.buffers()])
    taken |= _storages(fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr")
    for (old, new), value in zip(handed, values, strict=True):
        if _storages([value]) & taken or len(new.users) > 1:
            return Fail(
                f"{old.name} goes to {old.meta[HANDED_KEY]}, code that may write to it: its "
                f"replacement {new.name} would share memory with another value"
            )
    return None


def _in_model_dtypes(probe: Probe) -> dict[fx.Node, Any]:
    return {
        n: v.to(probe.dtypes[n]) if isinstance(v, torch.Tensor) and n in probe.dtypes else v
        for n, v in probe.feeds.items()
    }


def _storages(values: Any) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor)}
