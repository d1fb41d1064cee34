"""Fuzzing ``repfx.fold`` with small adversarial models.

Each test draws models from some bug classes of ``fuzz_models.BUG_CLASSES`` and judges every
fold with ``fuzz_oracle`` (fresh inputs, per-output, NaN-aware, float64 exactness, input
mutation, the original untouched). The number of models per run comes from the
``<profile>-fuzzer`` Hypothesis profile (``tests/profiles.py``: 50 deterministic models in plain
``pytest``, 2,000 in ``pytest --full``, 24,000 random ones with ``HYPOTHESIS_PROFILE=fuzz``),
shared among the tests below by :data:`PLANS`. ``pytest --hypothesis-show-statistics`` shows
how often each outcome occurred (folded, nothing folded, refused with which error —
``VerificationError`` included).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from fuzz_models import ALL_DTYPES, BUG_CLASSES, STATEFUL_CLASSES, Modifiers, fuzz_models
from fuzz_oracle import (
    Verdict,
    judge,
    judge_calls,
    judge_compiled,
    judge_compiled_after_changes,
    judge_python_scalar,
    judge_unbatched,
    judge_unverified,
)
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from profiles import fuzzer_settings

EVERYTHING = tuple(sorted(set(BUG_CLASSES) - set(STATEFUL_CLASSES)))
EVERY_MODIFIER = Modifiers(
    dtypes=ALL_DTYPES, channels_last=True, multi_output=True, top_level_hook=True
)


@dataclass(frozen=True)
class Plan:
    """What one test draws from, and its share of the run's models."""

    classes: tuple[str, ...]
    modifiers: Modifiers
    share: float

    def models(self):
        return fuzz_models(self.classes, self.modifiers)


PLANS = {
    "inplace": Plan(("inplace",), Modifiers(), 0.10),
    "hooks": Plan(("hooks", "opaque"), Modifiers(top_level_hook=True), 0.10),
    "functional": Plan(("functional",), Modifiers(), 0.10),
    "conv_subclass": Plan(("conv_subclass",), Modifiers(), 0.05),
    "parametrize": Plan(("parametrize",), Modifiers(), 0.05),
    "padding": Plan(("padding",), Modifiers(), 0.12),
    "arithmetic": Plan(("arithmetic",), Modifiers(), 0.10),
    "dtypes": Plan(("dtype", "grammar", "arithmetic"), Modifiers(dtypes=ALL_DTYPES), 0.10),
    "layouts": Plan(("layout", "grammar", "padding"), Modifiers(channels_last=True), 0.05),
    "multi_output": Plan(EVERYTHING, Modifiers(multi_output=True), 0.05),
    "everything": Plan(EVERYTHING, EVERY_MODIFIER, 0.12),
    "state": Plan(("state", "grammar"), Modifiers(), 0.03),
    "special": Plan(("special", "grammar", "arithmetic"), Modifiers(), 0.03),
}
UNBATCHED_PLAN = Plan(("grammar", "padding", "functional", "arithmetic"), Modifiers(), 0.02)
COMPILE_PLAN = Plan(
    ("grammar", "padding", "functional", "hooks", "inplace", "parametrize"),
    Modifiers(max_blocks=2, multi_output=True),
    0.006,  # on top of the others (12 models in ci): compiling is slow
)
SCALAR_PLAN = Plan(("grammar", "padding", "arithmetic"), Modifiers(max_blocks=2), 0.005)
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10× faster on one thread than on two (no OpenMP hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fuzz_settings(share: float) -> settings:
    """The fuzzer profile of the active Hypothesis profile (``tests/profiles.py``), with
    ``share`` of its models."""
    parent = fuzzer_settings()
    return settings(parent, max_examples=max(1, round(parent.max_examples * share)))


def check(verdict: Verdict) -> None:
    for outcome in verdict.events:
        event(outcome)
    verdict.raise_first()


def fold_is_exact(model, seed) -> None:
    note(model.describe())
    check(judge(model, seed))


@fuzz_settings(PLANS["inplace"].share)
@given(PLANS["inplace"].models(), seeds)
def test_inplace_ops(model, seed):
    """``relu_`` / ``add_`` / ``+=`` / ``ReLU(inplace=True)`` between branches, after no-ops."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["hooks"].share)
@given(PLANS["hooks"].models(), seeds)
@pytest.mark.filterwarnings("ignore:module forward hook with ``always_call=True`` raised")  # a trap
def test_hooks(model, seed):
    """Forward / pre hooks on modules a fold would remove or rewrite, and on the model; modules
    no front end captures that read a container of blocks as a value, and perhaps inside it."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["functional"].share)
@given(PLANS["functional"].models(), seeds)
def test_functional_operands(model, seed):
    """Conditional / training-mode / ``torch.batch_norm`` BNs, default-training dropout,
    random and activation-dependent operands."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["conv_subclass"].share)
@given(PLANS["conv_subclass"].models(), seeds)
def test_conv_subclasses(model, seed):
    """Conv subclasses overriding ``_conv_forward`` (weight standardisation and others)."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["parametrize"].share)
@given(PLANS["parametrize"].models(), seeds)
def test_parametrized_convs(model, seed):
    """``weight_norm`` / ``spectral_norm`` / custom parametrizations next to BN and sums."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["padding"].share)
@given(PLANS["padding"].models(), seeds)
def test_padding_and_windows(model, seed):
    """Padding modes, crops, even dilated kernels, strides, groups, ``'same'``, 1-d / 3-d,
    transposed convs, explicit pads."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["arithmetic"].share)
@given(PLANS["arithmetic"].models(), seeds)
def test_arithmetic_spellings(model, seed):
    """``c − x``, ``torch.sub(c, x, alpha=a)``, division, ``addcmul(value=)`` and friends."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["dtypes"].share)
@given(PLANS["dtypes"].models(), seeds)
def test_dtypes(model, seed):
    """float16 / bfloat16 / float64 models, float32 scales next to float16 convs, integer
    chains, ``Tensor.view(dtype)``."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["layouts"].share)
@given(PLANS["layouts"].models(), seeds)
def test_layouts_and_channels_last(model, seed):
    """Channels-last inputs and models; linears over the width; permutes and views."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["multi_output"].share)
@given(PLANS["multi_output"].models(), seeds)
def test_multi_output(model, seed):
    """``(1e6 · a, b)``: a wrong fold of ``b`` is judged against ``b``'s own scale."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["everything"].share)
@given(PLANS["everything"].models(), seeds)
def test_everything(model, seed):
    """Blocks of every class, chained, with every model-level trap."""
    fold_is_exact(model, seed)


@fuzz_settings(PLANS["special"].share)
@given(PLANS["special"].models(), seeds)
def test_signed_zeros_and_non_finite_values(model, seed):
    """−0.0, ±inf and NaN made inside the model (``−relu``, ``log(relu)``, ``y / relu(y)``),
    through no-op-like ops (``+ 0`` is not one at −0.0) into ops that tell them apart; folded
    with example inputs, and without (where only the commit point stands in the way)."""
    fold_is_exact(model, seed)
    check(judge_unverified(model, seed))


@fuzz_settings(PLANS["state"].share)
@given(PLANS["state"].models(), seeds)
def test_state_written_in_forward(model, seed):
    """A forward writes a BN's statistics or affine, a conv's weight (``.data``, slices, item
    assignment) or a buffer counter: the folded model matches the original call after call."""
    note(model.describe())
    check(judge_calls(model, seed))


@fuzz_settings(COMPILE_PLAN.share)
@given(COMPILE_PLAN.models(), seeds)
def test_compile_backend(model, seed):
    """``torch.compile(model, backend=repfx.compile_backend(inner="eager"))`` under no_grad
    and with grad enabled on trainable parameters: outputs and gradients unchanged; and after
    a parameter written in place, ``load_state_dict`` or a training step between two calls,
    the second call matches eager (never the stale folded constants)."""
    note(model.describe())
    check(judge_compiled(model, seed))
    check(judge_compiled_after_changes(model, seed))


@fuzz_settings(SCALAR_PLAN.share)
@given(SCALAR_PLAN.models(), seeds)
def test_python_scalar_inputs_under_export(model, seed):
    """``forward(x, s)`` with a Python float, captured by torch.export on one value of ``s``:
    another value gives the original's output or a ``repfx.GuardError``."""
    note(model.describe())
    check(judge_python_scalar(model, seed))


@fuzz_settings(UNBATCHED_PLAN.share)
@given(UNBATCHED_PLAN.models(), seeds)
def test_unbatched_inputs_without_example_inputs(model, seed):
    """Folded without example inputs, called on one item without its batch axis: the same
    output as the original, or a ``repfx.GuardError`` naming the rank the fold assumed."""
    note(model.describe())
    check(judge_unbatched(model, seed))


def test_plans_share_the_whole_run():
    assert abs(sum(plan.share for plan in PLANS.values()) - 1.0) < 1e-9
    assert settings.get_profile("ci-fuzzer").max_examples >= 2000
    assert settings.get_profile("ci-fuzzer").derandomize
    assert settings.get_profile("fuzz-fuzzer").max_examples >= 20000


def test_every_bug_class_has_its_own_test():
    """Guard against a class that no test draws from on its own (where a failure of another
    class cannot stop it first)."""
    alone = set().union(*(plan.classes for plan in PLANS.values() if len(plan.classes) <= 3))
    assert alone == set(BUG_CLASSES)
