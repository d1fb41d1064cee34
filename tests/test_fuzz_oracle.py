"""The fuzz oracle's own excuses: each is narrow enough that a wrong fold still fails."""

import fuzz_oracle as oracle
import torch
import torch.nn.functional as F
from torch import nn


class NoisyScale(nn.Module):
    """``conv(x) · (s + randn_like(s)) − conv(x)``: random, with cancellation."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1).to(dtype)
        self.scale = nn.Parameter(torch.randn(4, 1, 1, dtype=dtype))

    def forward(self, x):
        y = self.conv(x)
        y = y * (self.scale + torch.randn_like(self.scale)) - y
        return F.dropout(y, 0.5, training=True)


class Divide(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.scale = nn.Parameter(torch.rand(3, 1, 1) + 0.5)
        self.spelling = spelling

    def forward(self, x):
        return self.spelling(self, self.conv(x))


def test_replayed_draws_make_a_float64_run_of_a_random_model_its_float64_truth():
    torch.manual_seed(0)
    model, x = NoisyScale(), torch.randn(2, 3, 6, 6)
    recorder = oracle.RandomDraws()
    out32 = oracle.run(model, (x,), seed=7, mode=recorder)[0]
    assert len(recorder.draws) == 2  # randn_like, the dropout's mask

    model64, x64 = oracle.double_copy(model), oracle.to_double((x,))
    replay = oracle.RandomDraws(recorder.draws)
    replayed = oracle.run(model64, x64, seed=7, mode=replay)[0]

    assert replay.faithful()
    assert oracle.relative_error(out32, replayed) < 1e-5


def test_a_replay_that_runs_out_of_draws_is_not_faithful():
    torch.manual_seed(0)
    model, x = NoisyScale(), torch.randn(2, 3, 6, 6)
    recorder = oracle.RandomDraws()
    oracle.run(model, (x,), seed=1, mode=recorder)
    short = oracle.RandomDraws(recorder.draws[:1])
    oracle.run(model, (x,), seed=1, mode=short)
    assert not short.faithful()


def test_a_wrong_fold_of_a_random_model_is_not_excused_by_rounding():
    torch.manual_seed(0)
    model, x = NoisyScale(), torch.randn(2, 3, 6, 6)
    wrong = oracle.double_copy(model).float()
    with torch.no_grad():
        wrong.conv.bias.add_(1e-3)
    problems = oracle.output_problems(model, wrong, (x,), seed=3)
    assert [kind for kind, _ in problems] == ["wrong output"]


def test_an_exact_fold_of_a_random_model_passes():
    torch.manual_seed(0)
    model, x = NoisyScale(), torch.randn(2, 3, 6, 6)
    same = oracle.double_copy(model).float()
    assert oracle.output_problems(model, same, (x,), seed=3) == []


def test_divisions_by_activations_and_reciprocals_are_poles():
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 4),)
    poles = {
        "c / x": lambda m, y: m.scale / y,
        "x.reciprocal()": lambda m, y: y.reciprocal(),
        "x ** -1": lambda m, y: y**-1,
        "log(x.abs())": lambda m, y: y.abs().log(),
        "addcdiv(x, x, x)": lambda m, y: torch.addcdiv(y, y, y),
    }
    tame = {
        "x / c": lambda m, y: y / m.scale,
        "x / 2": lambda m, y: y / 2,
        "x ** 2": lambda m, y: y**2,
        "gelu": lambda m, y: F.gelu(y),
    }
    for name, spelling in poles.items():
        assert oracle.ill_conditioned(Divide(spelling), x, seed=0), name
    for name, spelling in tame.items():
        assert not oracle.ill_conditioned(Divide(spelling), x, seed=0), name


def test_thresholds_are_ill_conditioned():
    x = (torch.randn(2, 3, 4, 4),)
    assert oracle.ill_conditioned(Divide(lambda m, y: y // 0.25), x, seed=0)
    assert oracle.ill_conditioned(Divide(lambda m, y: (y > 0).float()), x, seed=0)


class HalfOnlyTail(nn.Module):
    """``|conv(x) · s|`` through an int16 view: only runs on float16 values (as a traced
    ``view(torch.int16)`` is baked for them); ``fused`` folds ``s`` into the conv."""

    def __init__(self, conv: nn.Conv2d, scale: torch.Tensor, fused: bool):
        super().__init__()
        self.conv, self.fused = conv, fused
        self.scale = nn.Parameter(scale)

    def forward(self, x):
        y = self.conv(x) if self.fused else self.conv(x) * self.scale
        if y.dtype != torch.float16:
            raise TypeError(f"an int16 view of {y.dtype}")
        return (y.view(torch.int16) & 0x7FFF).view(torch.float16)


def half_only_pair(error: float):
    """An original in float16 whose float64 copy runs (its tail adapts), and a fold of it
    (``s`` in the conv, off by ``error`` relative) whose float64 copy cannot."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    scale = torch.rand(4, 1, 1) + 0.5

    class Original(HalfOnlyTail):
        def forward(self, x):
            y = self.conv(x) * self.scale
            return y.abs()  # what the int16 view computes, in any dtype

    original = Original(conv, scale, fused=False).half()
    fused = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale[:, None] * (1 + error))
        fused.bias.copy_(conv.bias * scale.flatten() * (1 + error))
    folded = HalfOnlyTail(fused, torch.ones(4, 1, 1), fused=True).half()
    return original, folded, (torch.randn(2, 3, 8, 8).half(),)


def test_a_fold_that_only_runs_in_its_own_precision_is_judged_in_it():
    original, folded, x = half_only_pair(error=0.0)
    assert isinstance(oracle.run(oracle.double_copy(folded), oracle.to_double(x), 0)[0], Exception)
    assert oracle.rounding_excuses(original, folded, x, seed=0, index=0)
    original, wrong, x = half_only_pair(error=0.05)
    assert not oracle.rounding_excuses(original, wrong, x, seed=0, index=0)


class Pole(nn.Module):
    """``1 / conv(x)``, evaluated where ``conv(x)`` is 1e-7 at one position."""

    def __init__(self, bias: float):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1).double()
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(bias)

    def forward(self, x):
        return 1 / self.conv(x)


def test_a_float64_fold_behind_a_pole_is_judged_by_the_outputs_conditioning():
    x = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    x[0, 0, 0, 0] = 1 + 1e-7
    original = Pole(bias=-1.0)
    rerounded = Pole(bias=-1.0 * (1 + 4 * torch.finfo(torch.float64).eps))  # a few ulps off
    assert oracle.mismatch(rerounded(x), original(x)) is not None  # beyond 1e-10
    assert oracle.output_problems(original, rerounded, (x,), seed=0) == []
    wrong = Pole(bias=-1.0 * (1 + 1e-9))
    problems = oracle.output_problems(original, wrong, (x,), seed=0)
    assert [kind for kind, _ in problems] == ["wrong output"]


def test_the_compile_judges_start_eager_and_compiled_runs_from_the_same_state():
    """A BN kept in training mode updates its running mean on every call, and the model reads
    it: eager and compiled runs compared from different states would differ without any fold
    (plain dynamo too). The judges run eager on a copy in the compiled model's state."""
    import types

    from fuzz_blocks import TrainModeBatchNorm
    from fuzz_common import Shape
    from grammar import randomise_

    block = TrainModeBatchNorm(
        Shape(1, (4, 4, 4)),
        "BatchNorm kept in training mode, + its running mean",
        nn.Conv3d(1, 1, 1),
    )
    net = randomise_(nn.Sequential(block, nn.GELU()), torch.Generator().manual_seed(0)).eval()

    def inputs(generator, batch=None, dtype=None):
        return (torch.randn(batch or 2, 1, 4, 4, 4, generator=generator),)

    model = types.SimpleNamespace(module=net, inputs=inputs, batch=2)
    for seed in range(3):  # one of each change after compiling
        assert oracle.judge_compiled(model, seed).problems == []
        assert oracle.judge_compiled_after_changes(model, seed).problems == []


def test_a_wrong_fold_behind_a_pole_with_a_python_scalar_input_fails_in_float64():
    """``judge_python_scalar`` judges as every fold does: behind a pole (``s / conv(x)``) a
    float32 fold is excused, so the float64 copy's fold is judged too, with no excuse."""
    torch.manual_seed(0)
    model = oracle.WithScalar(Divide(lambda m, y: m.scale / y)).eval()
    x = torch.randn(2, 3, 6, 6)
    assert oracle.ill_conditioned(model, (x, 2.0), seed=3)
    wrong = oracle.double_copy(model)
    with torch.no_grad():
        wrong.module.conv.bias.add_(1e-3)
    model64, x64 = oracle.double_copy(model), oracle.to_double((x,))[0]
    assert oracle.output_problems(model64, oracle.double_copy(model64), (x64, 2.0), seed=3) == []
    problems = oracle.output_problems(model64, wrong, (x64, 2.0), seed=3)
    assert [kind for kind, _ in problems] == ["wrong output"]


def test_a_gradient_is_judged_on_the_scale_of_all_the_gradients():
    """A gradient the loss does not depend on is rounding noise (1e-19 beside O(1) ones): its own
    relative error means nothing; a small gradient that is really off still fails."""
    big = torch.tensor([1.0, -2.0], dtype=torch.float64)
    noise = torch.tensor([8.7e-19], dtype=torch.float64)
    small = torch.tensor([1e-3], dtype=torch.float64)
    expected = ([torch.zeros(1, dtype=torch.float64)], [big, noise, small])
    same_but_noise = ([torch.zeros(1, dtype=torch.float64)], [big, -noise, small])
    off = ([torch.zeros(1, dtype=torch.float64)], [big, noise, small * 1.01])
    assert oracle._compare_compiled(expected, same_but_noise) == []
    assert [p for p in oracle._compare_compiled(expected, off) if "parameter 2" in p]
