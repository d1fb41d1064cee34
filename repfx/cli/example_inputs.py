"""``--input-shape``: the shapes parsed and checked against the model's ``forward``, and the
seeded random example inputs made from them."""

from __future__ import annotations

import inspect
import math
import os

import torch
from torch import nn

from .errors import UsageError

MAX_INDEX = 2**63 - 1  # torch sizes are int64


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: expected comma-separated integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r}: every dimension must be positive")
    if math.prod(shape) > MAX_INDEX:
        raise UsageError(
            f"--input-shape {text!r}: the input is too large ({math.prod(shape):.3g} elements; "
            "PyTorch tensors hold at most 2**63 - 1)"
        )
    return shape


def shapes_text(shapes: list[tuple[int, ...]]) -> str:
    """The shapes as they were given: ``1,3,32,32 1,3,32,32``."""
    return " ".join(",".join(map(str, s)) for s in shapes)


def make_example_inputs(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> tuple:
    """Seeded random normal inputs; :class:`UsageError` for shapes too large to allocate."""
    generator = torch.Generator().manual_seed(0)
    nbytes = sum(math.prod(s) for s in shapes) * max(4, dtype.itemsize)  # drawn in float32
    memory = _physical_memory()
    if memory is not None and nbytes > memory:
        raise UsageError(
            f"--input-shape {shapes_text(shapes)}: the input is too large: "
            f"{_gigabytes(nbytes)} of {str(dtype).removeprefix('torch.')}, more than this "
            f"machine's {_gigabytes(memory)} of memory; pass a smaller shape"
        )
    try:
        return tuple(torch.randn(shape, generator=generator).to(dtype) for shape in shapes)
    except (RuntimeError, MemoryError) as exc:
        raise UsageError(
            f"--input-shape {shapes_text(shapes)}: the input is too large: "
            f"{_gigabytes(nbytes)} could not be allocated ({type(exc).__name__}); pass a "
            "smaller shape"
        ) from exc


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_input_count(model: nn.Module, shapes: list[tuple[int, ...]], description: str) -> None:
    """One ``--input-shape`` per positional input of ``model.forward``: fold traces the model
    with torch.fx, which would ignore extra inputs, so count them before."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no introspectable signature: fold will tell
        return
    try:
        signature.bind(*shapes)
    except TypeError as exc:
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        name = f"{type(model).__name__}.forward{bare}"
        raise UsageError(
            f"wrong --input-shape {shapes_text(shapes)} for {description}: "
            f"{len(shapes)} example input{'s' if len(shapes) != 1 else ''} given, but {name} "
            f"cannot take them ({exc}); pass one --input-shape per input of forward"
        ) from None


def model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()
