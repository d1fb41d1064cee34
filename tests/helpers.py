"""Small helpers for tests that run one pass on a traced graph."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import repfx
from repfx import algebra
from repfx.capture import capture, copy_model, propagate_shapes
from repfx.ir.graph import annotate_ranks
from repfx.passes.base import FoldContext, apply_rule
from repfx.passes.rewrite import replace_node
from repfx.report.fold_report import Folded
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
    """Records each dispatched multiply (``mul``, ``div``, ``addcmul``) by a per-channel
    constant of ``module``: a parameter or buffer holding more than one element, or a tensor
    computed from such tensors alone on this run (``exp(logit_scale.clamp(...))``, which a
    fold may store instead). Scalars, such as StarReLU's, are not counted. A computed constant
    is named after the tensors it is computed from."""

    _OPS = {"mul", "mul_", "div", "div_", "addcmul", "addcmul_"}

    def __init__(self, module: nn.Module):
        super().__init__()
        self.names: dict[int, str] = {}
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            self.names.setdefault(t.untyped_storage().data_ptr(), name)
        self.computed: list[torch.Tensor] = []  # kept alive: their storage is never reused
        self.found: list[str] = []

    def _name(self, t: object) -> str | None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        return self.names.get(t.untyped_storage().data_ptr())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        names = [self._name(a) for a in tensors]
        if func.overloadpacket.__name__ in self._OPS:
            pairs = zip(tensors, names, strict=True)
            stored = [n for a, n in pairs if n is not None and a.numel() > 1]
            if stored:
                self.found.append(",".join(stored))
        elif tensors and None not in names:  # computed from stored tensors alone
            for result in pytree.tree_leaves(out):
                if isinstance(result, torch.Tensor) and self._name(result) is None:
                    self.names[result.untyped_storage().data_ptr()] = ",".join(dict.fromkeys(names))
                    self.computed.append(result)
        return out


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


def commit_replacement(
    model: nn.Module, pick: Callable[[fx.Node], bool], replacement: nn.Module, *example
) -> Folded:
    """Ask the commit point to replace the one node ``pick`` selects (a call reading one
    value) by ``replacement`` of that value; raises ``RewriteRejected`` when the proof fails."""
    gm = traced(model, *example)
    outcomes: list[Folded] = []

    def rule(ctx: FoldContext, node: fx.Node):
        if not pick(node) or outcomes:
            return None
        x = node.args[0]

        def rewrite() -> tuple[list[fx.Node], str]:
            ctx.gm.add_submodule("replacement", replacement)
            with ctx.gm.graph.inserting_before(node):
                new = ctx.gm.graph.call_module("replacement", (x,))
            new.meta.update(node.meta)
            replace_node(node, new)
            return [new], "replaced"

        outcomes.append(ctx.commit("test", node.name, [node], [x], rewrite))
        return outcomes[-1]

    apply_rule(gm, rule)
    assert len(outcomes) == 1 and isinstance(outcomes[0], Folded), outcomes
    return outcomes[0]


def is_conv_module(node: fx.Node) -> bool:
    """The call of the model's ``conv`` submodule."""
    return node.op == "call_module" and node.target == "conv"


def scaled_conv(conv: nn.Conv2d, factor: float) -> nn.Conv2d:
    """A copy of ``conv`` computing ``factor`` times its output (weight and bias scaled): a
    replacement off by ``factor - 1`` of the output's scale."""
    scaled = copy.deepcopy(conv)
    with torch.no_grad():
        scaled.weight.mul_(factor)
        scaled.bias.mul_(factor)
    return scaled
