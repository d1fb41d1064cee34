"""Which tensors share memory: the identity of a tensor's storage, the same for all its views
and aliases (a parameter and ``p.detach()``, ``p.data``, ``p[:2]``, ``p.view(...)``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def storage_key(tensor: object) -> int | None:
    """The identity of a tensor's memory, shared by its views; ``None`` for what has none (not a
    tensor, a sparse tensor, a wrapper subclass without a storage)."""
    if not isinstance(tensor, torch.Tensor):
        return None
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def keys_of(tensors: Iterable[object]) -> set[int]:
    """The memory of each tensor among ``tensors`` (:func:`storage_key`)."""
    return {k for t in tensors if (k := storage_key(t)) is not None}
