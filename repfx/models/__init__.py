"""Reference models (PoolFormer, RIFormer; RepVGG, ACNet, DBB, MobileOne) and a small
name -> factory registry.

``create("riformer_s12", num_classes=10)`` builds a model; ``names()`` lists what is known;
``register("name")`` adds a factory to the default registry. A :class:`Registry` can also be
instantiated on its own (tests do, so they never touch the default one).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from . import acnet, dbb, metaformer, mobileone, repvgg
from .acnet import ACBlock, ACNet
from .dbb import BNAndPad, DBBlock, DBNet
from .metaformer import (
    Affine,
    DropPath,
    MetaFormer,
    MetaFormerBlock,
    Mlp,
    PatchEmbed,
    PoolFormer,
    PoolFormerBlock,
    Pooling,
    RIFormer,
    RIFormerBlock,
)
from .mobileone import MobileOne, MobileOneBlock
from .repvgg import RepVGG, RepVGGBlock

# The classes the package re-exports, family by family; with the registry's API, its __all__.
_EXPORTED_CLASSES = (
    (MetaFormer, PoolFormer, RIFormer, MetaFormerBlock, PoolFormerBlock, RIFormerBlock),
    (Affine, DropPath, Mlp, PatchEmbed, Pooling),
    (RepVGG, RepVGGBlock),
    (ACNet, ACBlock),
    (DBNet, DBBlock, BNAndPad),
    (MobileOne, MobileOneBlock),
)
__all__ = sorted(
    [cls.__name__ for family in _EXPORTED_CLASSES for cls in family]
    + ["Registry", "create", "names", "register"]
)

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)


class Registry:
    """Maps model names to factories ``(**kwargs) -> nn.Module``."""

    def __init__(self) -> None:
        self._factories: dict[str, Factory] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering a factory under ``name``; duplicate names are an error."""

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ValueError(f"model name {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def create(self, name: str, **kwargs: Any) -> nn.Module:
        """Build the model registered as ``name``; ``kwargs`` override its configuration."""
        try:
            factory = self._factories[name]
        except KeyError:
            raise KeyError(self._unknown_message(name)) from None
        return factory(**kwargs)

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown model {name!r}.{hint} Known models: {', '.join(known)}"


_DEFAULT = Registry()

for _factory in (
    metaformer.poolformer_s12,
    metaformer.poolformer_s24,
    metaformer.poolformer_s36,
    metaformer.poolformer_m36,
    metaformer.poolformer_m48,
    metaformer.poolformer_tiny,
    metaformer.riformer_s12,
    metaformer.riformer_s24,
    metaformer.riformer_s36,
    metaformer.riformer_m36,
    metaformer.riformer_m48,
    metaformer.riformer_tiny,
    repvgg.repvgg_a0,
    repvgg.repvgg_tiny,
    acnet.acnet_tiny,
    dbb.dbb_tiny,
    mobileone.mobileone_tiny,
):
    _DEFAULT.register(_factory.__name__)(_factory)
del _factory


def register(name: str) -> Callable[[F], F]:
    """Register a factory in the default registry: ``@register("my_model")``."""
    return _DEFAULT.register(name)


def names() -> list[str]:
    """Sorted names of all registered models."""
    return _DEFAULT.names()


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; unknown names raise ``KeyError`` with close-match hints."""
    return _DEFAULT.create(name, **kwargs)
