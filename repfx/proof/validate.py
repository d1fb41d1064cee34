"""Translation validation: every rewrite is proven on probes before it is committed.

A rewrite claims that the sub-graph it replaces and its replacement compute the same function.
The commit point (``FoldContext.commit`` in ``repfx.passes.base``) checks that claim with this
module, in three steps:

1. **Region.** Before the graph changes, the *old region* is collected: walking back from the
   values the rewrite must preserve (its ``outputs``) to the ``inputs`` the pass names, through
   every op in between. Constants (module attributes and expressions of them only) are part of
   the region, with their current values. Any other value the region reads — a placeholder,
   a parameter that arrives as a graph input, a weight computed from an activation — is an
   *operand*: it gets random probe values like an input, so the proof holds for every value it
   may take. So is a value the region reads only the shape of (a crop bound ``x.shape[1]``)
   and does not compute itself.
2. **Probes.** Each input and operand gets a shape: its recorded shape when shapes were
   propagated (``tensor_meta``, or the fake tensor dynamo / export attach), first with the
   non-channel dimensions shrunk to small sizes; otherwise shapes guessed from the region's
   channel counts and ranks. Two probes are drawn, batch 2 and 1, standard-normal values; across
   the two, every spatial dimension gets an odd and an even size, one of which no stride from 2
   to 4 divides. A shape is accepted only if
   the old region runs on it (checked on meta tensors, which cost nothing).
3. **Proof.** The old region is evaluated in float64 on both probes before the rewrite, and the
   new region (walked back from the replacement values to the same inputs and operands) after
   it. Per output: equal shapes, the same NaN / Inf positions, the dtype the original would
   produce (the smaller probe run in the model's own dtypes), and a maximum difference within
   ``repfx.proof.tolerances.rewrite_tolerance`` of the output's scale. A wrong fold is off by O(1);
   a correct one only by the rounding of its folded constants to the model's dtype.

Why this is sound enough: every fold repfx makes is affine in its inputs and operands (or the
identity), so a polynomial-identity argument applies — two affine maps that agree on random
inputs agree everywhere, with probability 1. The border behaviour of convolutions (padding,
strides, crops) depends on the spatial size, which is why the probes use two size parities and
sizes the strides do not divide. Shape-dependent behaviour beyond that is covered by also
accepting the real shapes when the shrunk ones do not run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import one_line
from ..ir.graph import ConstantFolder, draws_random
from ..ir.match import Fail
from .depthwise import FastDepthwise, may_run_grouped_conv
from .probe_shapes import (
    InputSpec,
    candidate_shapes,
    channel_counts,
    input_spec,
    probe_sizes,
    recorded_shape_and_dtype,
)
from .region import Region, ValidationFailure, collect_region
from .special_values import (
    is_elementwise,
    same_special_values,
    with_special_values,
    zero_signs_differ,
    zero_signs_matter,
)
from .tolerances import rewrite_tolerance

PROBE_BATCHES = (2, 1)  # batch > 1 in one probe; the other is cheaper


# ----------------------------------------------------------------------------- evaluation


class _Converted:
    """Converts constants and module tensors for an evaluation, once per tensor."""

    def __init__(self, to_meta: bool):
        self.to_meta = to_meta
        self._done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        hit = self._done.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        if self.to_meta:
            out = torch.empty(value.shape, dtype=value.dtype, device="meta")
        elif value.is_floating_point():
            out = value.detach().to(torch.float64)
        else:
            out = value.detach()
        self._done[id(value)] = (value, out)
        return out


class RegionInterpreter(fx.Interpreter):
    """``torch.fx.Interpreter`` over one region of a graph, not the whole graph: the region's
    inputs and operands are fed (probe values), never read from placeholders; its constants are
    taken as collected; every constant and module tensor is converted with ``convert``
    (float64 promotion, meta tensors, or the identity for the model's own dtypes)."""

    _EVALUATED = ("call_module", "call_function", "call_method", "get_attr")

    def __init__(self, gm: fx.GraphModule, convert: Any):
        # Not fx.Interpreter.__init__, which lists every submodule of ``gm`` for nothing a
        # region run uses (modules are fetched by path): a fold evaluates a few regions per
        # rewrite, so that listing made fold time grow with the square of the model's depth.
        # Set here is the state run_node reads (a newer torch needing more fails loudly).
        self.module, self.graph, self.submodules = gm, gm.graph, {}
        self.env: dict[fx.Node, Any] = {}
        self.name = type(self).__name__
        self.garbage_collect_values = False
        self.extra_traceback = True
        self.convert = convert

    def run_region(self, region: Region, feeds: dict[fx.Node, Any]) -> list[Any]:
        """Run ``region`` on ``feeds`` (values of its inputs); returns its outputs."""
        self.env = dict(feeds)
        for node, value in region.constants.items():
            self.env[node] = self.convert(value)
        fast = FastDepthwise() if may_run_grouped_conv(self.module, region.ops) else nullcontext()
        with torch.no_grad(), fast:  # (float64 depthwise convs without a per-channel loop)
            for node in region.ops:
                self.env[node] = self.run_node(node)
        return [self.env[o] for o in region.outputs]

    def run_node(self, n: fx.Node) -> Any:
        if n.op not in self._EVALUATED:
            raise ValidationFailure(f"cannot evaluate a {n.op} node")
        return super().run_node(n)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        """The module run on its converted parameters and buffers (the module is untouched)."""
        module = self.fetch_attr(target)
        state = {
            name: self.convert(t)
            for name, t in itertools.chain(module.named_parameters(), module.named_buffers())
        }
        return functional_call(module, state, args, kwargs, tie_weights=False, strict=False)


def evaluate(
    gm: fx.GraphModule, region: Region, feeds: dict[fx.Node, Any], convert: Any
) -> list[Any]:
    """Run ``region`` on ``feeds`` (values of its inputs), converting every constant and module
    tensor with ``convert`` (float64 promotion, or meta tensors). Returns the outputs."""
    return RegionInterpreter(gm, convert).run_region(region, feeds)


# ----------------------------------------------------------------------------- the proof


@dataclass
class Probe:
    feeds: dict[fx.Node, Any]  # float64 values (other dtypes for non-floating inputs)
    dtypes: dict[fx.Node, torch.dtype]  # the inputs' own dtypes


@dataclass(frozen=True)
class SpecialValuesDiffer(Fail):
    """The replacement equals the old region on the numbers, not on the sign of an infinity or
    of a zero that a later op reads: not exact there, a refusal rather than a wrong rule."""


@dataclass
class Proof:
    """The old region and its values on the probes, taken before the rewrite."""

    region: Region
    probes: list[Probe]
    expected: list[list[Any]]  # per probe, per output (float64)
    dtypes: list[torch.dtype | None]  # per output, in the model's own dtypes (None: no tensor)
    special: Probe | None = None  # inputs holding special values (repfx.proof.special_values)
    special_expected: list[Any] | None = None  # the old region's outputs on it

    def check_special_values(
        self, gm: fx.GraphModule, replacements: Sequence[fx.Node]
    ) -> Fail | None:
        """Why the replacement, which passed :meth:`check`, differs from the old region on
        signed zeros, infinities or NaN (``None``: it does not, or the region is not
        elementwise; see ``repfx.proof.special_values``)."""
        if self.special is None or self.special_expected is None:
            return None
        stops = [n for n in self.region.inputs if not n._erased]
        new = collect_region(list(replacements), stops, ConstantFolder(gm))
        try:
            actual = evaluate(gm, new, self.special.feeds, _Converted(to_meta=False))
        except Exception as exc:
            return Fail(f"the replacement fails on special values: {one_line(exc)}")
        expected = [self.special_expected]
        return self._compare(gm, replacements, expected, [actual], " on special values")

    def check(self, gm: fx.GraphModule, replacements: Sequence[fx.Node]) -> Fail | None:
        """Why the replacement differs from the old region (``None``: it does not)."""
        consts = ConstantFolder(gm)
        stops = [n for n in self.region.inputs if not n._erased]
        try:
            new = collect_region(list(replacements), stops, consts)
        except ValidationFailure as exc:
            return Fail(str(exc))
        unknown = [n for n in new.inputs if n not in self.probes[0].feeds]
        if unknown:
            return Fail(f"the replacement reads {unknown[0].name}, which the region did not")
        try:
            dtypes = dtypes_of(gm, new, self.probes[-1])
            to_f64 = _Converted(to_meta=False)
            actuals = [evaluate(gm, new, probe.feeds, to_f64) for probe in self.probes]
        except Exception as exc:  # the replacement does not even run
            return Fail(f"the replacement fails on the probe: {one_line(exc)}")
        for i, (want, got) in enumerate(zip(self.dtypes, dtypes, strict=True)):
            if (fail := _same_dtype(want, got)) is not None:
                return Fail(f"output {i}: {fail.reason}")
        return self._compare(gm, replacements, self.expected, actuals, "")

    def _compare(
        self,
        gm: fx.GraphModule,
        replacements: Sequence[fx.Node],
        expected: Sequence[Sequence[Any]],
        actual: Sequence[Sequence[Any]],
        where: str,
    ) -> Fail | None:
        """Why the replacement's outputs on the probes (``actual``) differ from the old
        region's (``expected``): in their values (:func:`_same_values`), or only in the sign of
        an infinity or of a zero a later op reads (:class:`SpecialValuesDiffer`: exact on the
        numbers, not on those values)."""
        signs = None  # whether a later op reads the sign of a zero: looked up on demand
        for want_all, got_all in zip(expected, actual, strict=True):
            for i, (want, got) in enumerate(zip(want_all, got_all, strict=True)):
                if (fail := _same_values(want, got, self.dtypes[i])) is not None:
                    return Fail(f"output {i}{where}: {fail.reason}")
                if signs is None and zero_signs_differ(want, got):
                    signs = zero_signs_matter(gm, replacements)
                if (fail := same_special_values(want, got, bool(signs))) is not None:
                    return SpecialValuesDiffer(f"output {i}: {fail.reason}")
        return None


class _RefuseRandomOps(TorchDispatchMode):
    """A region that draws random numbers (``x · bernoulli(p)``, training-mode dropout) gives
    other values on every evaluation: nothing can be proven about it, and the evaluation would
    move the caller's random state."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if draws_random(func):
            raise ValidationFailure(
                f"the region draws random numbers ({func.name().removeprefix('aten::')}): no "
                "two evaluations agree"
            )
        return func(*args, **(kwargs or {}))


def _values_on(
    gm: fx.GraphModule, region: Region, feeds: dict[fx.Node, Any], to_f64: _Converted
) -> list[Any] | None:
    """The old region's outputs on a probe; ``None`` where it does not run on it (a shape
    guessed wrong). Raises ValidationFailure for a region that draws random numbers."""
    try:
        with _RefuseRandomOps():
            return evaluate(gm, region, feeds, to_f64)
    except ValidationFailure:
        raise
    except Exception:
        return None


def prove_before(
    gm: fx.GraphModule,
    outputs: Sequence[fx.Node],
    inputs: Sequence[fx.Node],
    consts: ConstantFolder,
) -> Proof:
    """Collect and evaluate the old region on two probes (raises ValidationFailure)."""
    region = collect_region(outputs, inputs, consts)
    device = _device_of(gm, region)
    specs = {n: input_spec(n, device, gm, region) for n in region.inputs}
    dtypes = {n: _probe_dtype(specs[n], gm, region) for n in region.inputs}
    channels = channel_counts(gm, region)
    to_f64 = _Converted(to_meta=False)
    probes, expected = [], []
    generator = torch.Generator().manual_seed(0x5EED)
    for sizes, batch in zip(probe_sizes(gm, region), PROBE_BATCHES, strict=False):
        options = [candidate_shapes(specs[n], channels, sizes, batch) for n in region.inputs]
        for combo in itertools.islice(itertools.product(*options), 64):
            shapes = dict(zip(region.inputs, combo, strict=True))
            if not all(s.shape is not None for s in specs.values()) and not _runs_on_meta(
                gm, region, shapes, dtypes
            ):
                continue  # guessed shapes: try them on meta tensors first, which is free
            feeds = {n: _draw(shapes[n], dtypes[n], device, generator) for n in region.inputs}
            values = _values_on(gm, region, feeds, to_f64)
            if values is None:
                continue
            probes.append(Probe(feeds, dtypes))
            expected.append(values)
            break
    if not probes:
        raise ValidationFailure("no probe shape runs the region (pass example inputs)")
    proof = Proof(region, probes, expected, _output_dtypes(gm, region, probes[-1]))
    if region.ops and all(is_elementwise(gm, n) for n in region.ops):
        _add_special_probe(gm, proof, to_f64)
    return proof


def _add_special_probe(gm: fx.GraphModule, proof: Proof, to_f64: _Converted) -> None:
    """Give ``proof`` its probe of special values, where the old region runs on it."""
    feeds = with_special_values(proof.probes[-1].feeds)
    if feeds is None:
        return
    try:
        expected = evaluate(gm, proof.region, feeds, to_f64)
    except Exception:
        return
    proof.special = Probe(feeds, proof.probes[-1].dtypes)
    proof.special_expected = expected


def _runs_on_meta(
    gm: fx.GraphModule,
    region: Region,
    shapes: dict[fx.Node, tuple[int, ...]],
    dtypes: dict[fx.Node, torch.dtype],
) -> bool:
    feeds = {n: torch.empty(shapes[n], dtype=dtypes[n], device="meta") for n in region.inputs}
    try:
        evaluate(gm, region, feeds, _Converted(to_meta=True))
    except Exception:
        return False
    return True


def _as_meta(feeds: dict[fx.Node, Any], dtypes: dict[fx.Node, torch.dtype]) -> dict:
    return {
        n: torch.empty(v.shape, dtype=dtypes[n], device="meta")
        if isinstance(v, torch.Tensor)
        else v
        for n, v in feeds.items()
    }


def _output_dtypes(gm: fx.GraphModule, region: Region, probe: Probe) -> list:
    """The old region's output dtypes in the model's own dtypes: recorded by shape
    propagation (or dynamo), else computed."""
    recorded = [recorded_shape_and_dtype(o)[1] for o in region.outputs]
    if all(d is not None for d in recorded):
        return recorded
    return dtypes_of(gm, region, probe)  # (the caller passes its smallest probe)


def dtypes_of(gm: fx.GraphModule, region: Region, probe: Probe) -> list:
    """Output dtypes of ``region`` run in the model's own dtypes, on the probe cast to the
    inputs' dtypes (or, for ops without a kernel for that dtype here, on meta tensors)."""
    feeds = {
        n: v.to(probe.dtypes[n]) if isinstance(v, torch.Tensor) else v
        for n, v in probe.feeds.items()
    }
    try:
        outs = evaluate(gm, region, feeds, lambda v: v)
    except Exception:
        outs = evaluate(gm, region, _as_meta(probe.feeds, probe.dtypes), _Converted(True))
    return [o.dtype if isinstance(o, torch.Tensor) else None for o in outs]


def _device_of(gm: fx.GraphModule, region: Region) -> torch.device:
    for value in region.constants.values():
        return value.device
    for node in region.ops:
        if node.op == "call_module":
            for t in gm.get_submodule(node.target).parameters():
                return t.device
    return torch.device("cpu")


def _probe_dtype(spec: InputSpec, gm: fx.GraphModule, region: Region) -> torch.dtype:
    if spec.dtype is not None:
        return spec.dtype
    if not spec.is_float:
        return torch.int64
    for value in region.constants.values():
        if value.is_floating_point():
            return value.dtype
    for node in region.ops:
        if node.op == "call_module":
            for t in gm.get_submodule(node.target).parameters():
                if t.is_floating_point():
                    return t.dtype
    return torch.get_default_dtype()


def _draw(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Standard-normal float64 values for a floating input, small integers otherwise."""
    if dtype.is_floating_point:
        value = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif dtype == torch.bool:
        value = torch.randint(0, 2, shape, generator=generator).bool()
    else:
        value = torch.randint(-8, 9, shape, generator=generator).to(dtype)
    return value.to(device)


def _same_dtype(want: torch.dtype | None, got: torch.dtype | None) -> Fail | None:
    """Why an output's dtype differs from the original's (``None``: it does not)."""
    if (want is None) != (got is None):
        return Fail(f"produces {'a tensor' if got else 'no tensor'}, expected the opposite")
    if got != want:
        return Fail(f"dtype {got}, expected {want}")
    return None


def _same_values(want: Any, got: Any, dtype: torch.dtype | None) -> Fail | None:
    """Why an output's values differ from the original's beyond the commit point's tolerance
    (``None``: they do not)."""
    if not isinstance(want, torch.Tensor):
        return None if want == got else Fail(f"value {got!r}, expected {want!r}")
    if want.shape != got.shape:
        return Fail(f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not want.is_floating_point():
        return None if torch.equal(want, got) else Fail("integer values differ")
    want, got = want.double(), got.double()
    bad_want, bad_got = ~torch.isfinite(want), ~torch.isfinite(got)
    if not torch.equal(bad_want, bad_got):
        return Fail("non-finite values (NaN / Inf) where the original has none, or vice versa")
    if bool(bad_want.any()):  # (a mask copies both tensors: only where something is not finite)
        finite = ~bad_want
        if not bool(finite.any()):
            return None
        want, got = want[finite], got[finite]
    if want.numel() == 0:
        return None
    diff = (want - got).abs().max().item()
    scale = want.abs().max().item()
    tol = rewrite_tolerance(dtype or torch.float64)
    rel = diff / scale if scale > 0 else diff
    if rel > tol or math.isnan(rel):
        return Fail(f"differs by {rel:.3g} of the output's scale (tolerance {tol:.1g})")
    return None
