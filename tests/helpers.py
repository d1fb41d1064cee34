"""Small helpers for tests that run one pass on a traced graph."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

import repfx
from repfx import algebra
from repfx.capture import capture, copy_model, propagate_shapes
from repfx.ir.graph import annotate_ranks
from repfx.testing import assert_close


def traced(model: nn.Module, *example_inputs: torch.Tensor) -> fx.GraphModule:
    """What ``repfx.fold`` hands its passes: a traced copy with ranks (and shapes if given)."""
    gm, opaque = capture(copy_model(model))
    assert not opaque
    if example_inputs:
        propagate_shapes(gm, example_inputs)
    annotate_ranks(gm)
    return gm


def call_targets(gm: fx.GraphModule) -> list:
    """The targets of every call node, in order (module paths for call_module)."""
    return [n.target for n in gm.graph.nodes if n.op.startswith("call_")]


def apply(pass_, gm: fx.GraphModule):
    """Run one pass and regenerate the module's code, as the pipeline does."""
    result = pass_(gm)
    gm.graph.lint()
    gm.recompile()
    return result


def fold_recording_error(
    model: nn.Module, x: torch.Tensor
) -> tuple[fx.GraphModule | None, torch.Tensor | None, BaseException | None]:
    """``repfx.fold(model, (x,))`` and its output on ``x``, with the first error recorded
    instead of raised (a failed verification still yields the unverified fold, so structure
    tests can run), for test modules that share one fold across many tests."""
    error: BaseException | None = None
    folded: fx.GraphModule | None = None
    actual: torch.Tensor | None = None
    try:
        folded = repfx.fold(model, (x,))
    except repfx.VerificationError as exc:
        error = exc
        try:
            folded = repfx.fold(model, (x,), verify=False)
        except Exception:
            folded = None
    except Exception as exc:
        error = exc
    if folded is not None:
        try:
            with torch.no_grad():
                actual = folded(x)
        except Exception as exc:
            error = error or exc
    return folded, actual, error


def fresh_input(*shape: int, seed: int = 1) -> torch.Tensor:
    """A standard normal input of ``shape`` from its own seeded generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def fold_matches(model: nn.Module, example: torch.Tensor, fresh: torch.Tensor) -> fx.GraphModule:
    """Fold on ``example`` (verified), then compare with the original on ``fresh``."""
    folded = repfx.fold(model, (example,))
    with torch.no_grad():
        assert_close(folded(fresh), model(fresh))
    return folded


def batch_norms(folded: nn.Module) -> int:
    """BatchNorms left anywhere in a folded model: modules, and calls in its graphs."""
    modules = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    calls = sum(
        n.target in (torch.batch_norm, F.batch_norm)
        for m in folded.modules()
        if isinstance(m, fx.GraphModule)
        for n in m.graph.nodes
    )
    return modules + calls


class _StoredMultiplies(TorchDispatchMode):
    """Records each dispatched multiply (``mul``, ``div``, ``addcmul``) whose operand is a
    parameter or buffer of ``module`` holding more than one element (a per-channel constant;
    scalars such as StarReLU's are not counted)."""

    _OPS = {"mul", "mul_", "div", "div_", "addcmul", "addcmul_"}

    def __init__(self, module: nn.Module):
        super().__init__()
        self.names = {}
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.numel() > 1:
                self.names.setdefault(t.untyped_storage().data_ptr(), name)
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self._OPS:
            stored = [
                self.names[a.untyped_storage().data_ptr()]
                for a in args
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.names
            ]
            if stored:
                self.found.append(",".join(stored))
        return func(*args, **(kwargs or {}))


def stored_multiplies(module: nn.Module, *inputs: torch.Tensor) -> list[str]:
    """The names of ``module``'s per-channel constants that a run on ``inputs`` multiplies by
    (once per dispatched multiply)."""
    mode = _StoredMultiplies(module)
    with torch.no_grad(), mode:
        module(*inputs)
    return mode.found


class _Dispatched(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(module: nn.Module, *inputs: torch.Tensor) -> Counter[str]:
    """How many times a run of ``module`` on ``inputs`` dispatches each ATen op."""
    mode = _Dispatched()
    with torch.no_grad(), mode:
        module(*inputs)
    return mode.counts


def wrong_output_fold(weight, bias, affine):
    """``algebra.fold_affine_into_conv_output`` with its bias off by one: a plausible bug for
    the commit point to reject."""
    w, b = algebra.fold_affine_into_conv_output(weight, bias, affine)
    return w, b + 1
