"""Tensors the model itself writes when it runs — a training-mode batch norm's running
statistics, a buffer an in-place op updates — read elsewhere in the forward through a
computation (``2 * self.bn.running_mean.view(...)``, ``self.bn.running_var.sqrt()``,
``float(self.count)``): torch.fx runs such a computation once while tracing when it reads the
buffer as a plain tensor, and a fold must not keep the value it had then. Each model is folded
with and without example inputs, by each front end, and must agree with the original call after
call, each updating its own state.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from grammar import randomise_
from helpers import fresh_input
from torch import nn

import repfx
from repfx.testing import assert_close

CHANNELS = 4
MEAN = "running_mean"  # (a name read with getattr)


def _channel(t: torch.Tensor, rank: int = 4) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over an activation of ``rank``."""
    return t.view(1, -1, *([1] * (rank - 2)))


class ReadsBatchNormStatistics(nn.Module):
    """conv → eval BN (which folds), then a training-mode ``norm`` whose state ``read`` reads
    again after it runs."""

    def __init__(self, norm: nn.Module, read: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.conv = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.bn_eval = nn.BatchNorm2d(CHANNELS)
        self.norm, self.read = norm, read

    def forward(self, x):
        y = self.bn_eval(self.conv(x))
        return self.norm(y) + self.read(self, y)


class SyncLikeBatchNorm(nn.BatchNorm2d):
    """A subclass outside ``torch.nn`` (as timm's norm layers are): torch.fx traces through it
    (``nn.SyncBatchNorm`` itself is a ``torch.nn`` leaf)."""

    def forward(self, x):
        return super().forward(x)


READS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "2*mean.view": lambda m, y: 2 * m.norm.running_mean.view(1, -1, 1, 1),
    "var.sqrt": lambda m, y: _channel(m.norm.running_var.sqrt()),
    "ones*mean": lambda m, y: _channel(torch.ones(CHANNELS) * m.norm.running_mean),
    "getattr": lambda m, y: _channel(getattr(m.norm, MEAN).exp()),
    "mean[:2].sum": lambda m, y: m.norm.running_mean[:2].sum() * y,
    "count.float": lambda m, y: y * m.norm.num_batches_tracked.float(),
    "var.mean.item": lambda m, y: y * m.norm.running_var.mean().item(),
    "var.tolist": lambda m, y: y * m.norm.running_var.tolist()[1],
}


def _batch_norm(momentum: float | None = 0.1) -> nn.Module:
    return nn.BatchNorm2d(CHANNELS, momentum=momentum)


NORMS: dict[str, Callable[[], nn.Module]] = {
    "BatchNorm2d": _batch_norm,
    "momentum=None": lambda: _batch_norm(None),
    "subclass": lambda: SyncLikeBatchNorm(CHANNELS),
    "subclass_momentum=None": lambda: SyncLikeBatchNorm(CHANNELS, momentum=None),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(CHANNELS),  # (no process group: a batch norm)
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(CHANNELS, affine=True, track_running_stats=True),
}


def _trained(model: nn.Module, *training: nn.Module) -> nn.Module:
    """``model`` at O(1) parameters and statistics, in eval mode but for ``training``."""
    randomise_(model, torch.Generator().manual_seed(0))
    model.eval()
    for module in training:
        module.train()
    return model


def _fold(model: nn.Module, examples: bool, capture: str, shape: tuple[int, ...]):
    """``repfx.fold`` (verified where there are example inputs); ``None`` where
    ``capture="export"`` refuses a model that ``torch.export`` itself cannot export."""
    inputs = (fresh_input(*shape, seed=0),) if examples else None
    with warnings.catch_warnings():  # (training-mode modules on purpose: not under test here)
        warnings.simplefilter("ignore", repfx.TrainingModeWarning)
        try:
            return repfx.fold(model, inputs, capture=capture)
        except repfx.CaptureError as refusal:
            if capture != "export" or "torch.export cannot capture" not in str(refusal):
                raise
    with pytest.raises(Exception):  # noqa: B017 (any error of torch.export's own)
        torch.export.export(copy.deepcopy(model), inputs, strict=False)
    return None


def _agree_call_after_call(model: nn.Module, folded: nn.Module, shape: tuple[int, ...]) -> None:
    """Deep copies of ``model`` and ``folded`` agree on three calls, each on a fresh input of
    another batch size than the example's, each updating its own state; so do the states.
    (Nothing to run where ``torch.export`` refused the model: :func:`_fold`.)"""
    if folded is None:
        return
    original, folded = copy.deepcopy(model), copy.deepcopy(folded)
    for call in range(3):
        x = fresh_input(shape[0] + 1 + call, *shape[1:], seed=10 + call)
        with torch.no_grad():
            assert_close(folded(x), original(x))
    state = dict(original.named_buffers())
    for name, value in folded.named_buffers():
        if name in state:
            assert_close(value, state[name])


# (example inputs, front end): torch.fx without them; with them, each front end and the choice
FRONT_ENDS = {
    "without_inputs": (False, "auto"),
    "auto_with_inputs": (True, "auto"),
    "fx_with_inputs": (True, "fx"),
    "export": (True, "export"),
}
IMAGE = (2, 3, 6, 6)


# Every spelling of the read on a BatchNorm2d; every norm under two reads (a tensor, a number),
# and its batch count where it has one.
READ_NORM_PAIRS = sorted(
    {(r, "BatchNorm2d") for r in READS}
    | {(r, n) for r in ("var.sqrt", "var.mean.item") for n in NORMS}
    | {("count.float", n) for n in NORMS if n != "InstanceNorm2d"}
)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize(("read", "norm"), READ_NORM_PAIRS)
def test_a_computed_read_of_training_statistics_follows_them(read, norm, front_end):
    model = ReadsBatchNormStatistics(NORMS[norm](), READS[read])
    model = _trained(model, model.norm)
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, IMAGE)
    _agree_call_after_call(model, folded, IMAGE)
    assert model.norm.running_mean.abs().max() > 0.1  # (O(1) statistics, not identity ones)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_the_eval_batch_norm_beside_the_training_one_still_folds(norm, front_end):
    """Statistics that change are not constants; statistics nothing writes still are."""
    model = ReadsBatchNormStatistics(NORMS[norm](), READS["2*mean.view"])
    model = _trained(model, model.norm)
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, IMAGE)
    assert folded is None or folded.meta[repfx.REPORT_KEY].counts().get("fold_bn", 0) == 1
    _agree_call_after_call(model, folded, IMAGE)


class BatchNormOfRank(nn.Module):
    """A training-mode BatchNorm{1,3}d whose running variance is read again after it runs."""

    def __init__(self, rank: int):
        super().__init__()
        kinds = {3: nn.BatchNorm1d, 5: nn.BatchNorm3d}
        self.rank, self.bn = rank, kinds[rank](CHANNELS)
        self.scale = nn.Parameter(torch.ones(CHANNELS))

    def forward(self, x):
        y = x * _channel(self.scale, self.rank)
        return self.bn(y) * _channel(self.bn.running_var.rsqrt() + 1, self.rank)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("rank", [3, 5], ids=["BatchNorm1d", "BatchNorm3d"])
def test_batch_norms_of_other_ranks(rank, front_end):
    model = BatchNormOfRank(rank)
    model = _trained(model, model.bn)
    shape = (2, CHANNELS, 5) if rank == 3 else (2, CHANNELS, 3, 3, 3)
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, shape)
    _agree_call_after_call(model, folded, shape)


class FunctionalStatistics(nn.Module):
    """``F.batch_norm(training=True)`` on the module's own buffers, which the forward reads
    again, before and after, through computations."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(3, CHANNELS, 1)
        self.register_buffer("rm", torch.zeros(CHANNELS))
        self.register_buffer("rv", torch.ones(CHANNELS))

    def forward(self, x):
        y = self.conv(x)
        before = _channel(self.rv.sqrt())
        if self.spelling == "F.batch_norm":
            z = F.batch_norm(y, self.rm, self.rv, training=True, momentum=0.3)
        else:
            z = torch.batch_norm(y, None, None, self.rm, self.rv, True, 0.3, 1e-5, False)
        return z * before + 2 * _channel(self.rm)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("spelling", ["F.batch_norm", "torch.batch_norm"])
def test_statistics_a_functional_batch_norm_updates(spelling, front_end):
    model = _trained(FunctionalStatistics(spelling))
    with torch.no_grad():
        model.rm.normal_(generator=torch.Generator().manual_seed(3))
        model.rv.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, IMAGE)
    _agree_call_after_call(model, folded, IMAGE)


def _count_iadd(m: nn.Module, y: torch.Tensor) -> None:
    m.state += 1


def _add_mean(m: nn.Module, y: torch.Tensor) -> None:
    m.state += y.mean()


def _set_slice(m: nn.Module, y: torch.Tensor) -> None:
    m.state[1:3] = y.mean()


def _decay(m: nn.Module, y: torch.Tensor) -> None:
    m.state.mul_(0.9)


def _data_add(m: nn.Module, y: torch.Tensor) -> None:
    m.state.data.add_(y.mean())


def _item(m: nn.Module, y: torch.Tensor) -> None:
    m.state[0] = y.mean()


def _copy_mean(m: nn.Module, y: torch.Tensor) -> None:
    m.state.copy_(0.5 * m.state + 0.5 * y.mean())


UPDATES: dict[str, Callable[[nn.Module, torch.Tensor], None]] = {
    "+= 1": _count_iadd,
    "+= y.mean()": _add_mean,
    "setitem[1:3]": _set_slice,
    "mul_": _decay,
    ".data.add_": _data_add,
    "setitem": _item,
    "copy_": _copy_mean,
}


class UpdatesItsBuffer(nn.Module):
    """conv → BN (eval: folds), with a buffer the forward updates in place and reads through a
    computation, before or after the update."""

    def __init__(self, update: Callable[[nn.Module, torch.Tensor], None], read_first: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS)
        self.register_buffer("state", torch.linspace(0.5, 1.5, CHANNELS))
        self.update, self.read_first = update, read_first

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.read_first:
            scale = _channel(self.state.exp())
            self.update(self, y)
        else:
            self.update(self, y)
            scale = _channel(self.state.exp())
        return y * scale


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("read_first", [True, False], ids=["read_first", "update_first"])
@pytest.mark.parametrize("update", UPDATES)
def test_a_buffer_updated_in_place_and_read_through_a_computation(update, read_first, front_end):
    model = _trained(UpdatesItsBuffer(UPDATES[update], read_first))
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, IMAGE)
    _agree_call_after_call(model, folded, IMAGE)
    assert folded is None or folded.meta[repfx.REPORT_KEY].counts().get("fold_bn", 0) == 1


class Opaque(nn.Module):
    """A module torch.fx cannot trace (control flow on a value) that updates its own buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.linspace(1.0, 2.0, CHANNELS))

    def forward(self, y):
        if y.mean() > -100:  # (always: but torch.fx cannot know)
            self.seen.mul_(1.5)
        return y


class ReadsOpaqueState(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS)
        self.leaf = Opaque()

    def forward(self, x):
        y = self.leaf(self.bn(self.conv(x)))
        return y * _channel(self.leaf.seen.log()) + y * _channel(self.leaf.seen)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_the_state_of_code_torch_fx_cannot_trace_is_not_a_constant(front_end):
    model = _trained(ReadsOpaqueState())
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, IMAGE)
    _agree_call_after_call(model, folded, IMAGE)


class SharesTheBatchNorm(nn.Module):
    """A second module holds the training BN too and reads its statistics in its own forward."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, y):
        return y * _channel(self.bn.running_var.sqrt())


class ReadsInAnotherModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS)
        self.head = SharesTheBatchNorm(self.bn)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_statistics_read_by_another_module_holding_the_batch_norm(front_end):
    model = ReadsInAnotherModule()
    model = _trained(model, model.bn)
    examples, capture = FRONT_ENDS[front_end]
    folded = _fold(model, examples, capture, IMAGE)
    _agree_call_after_call(model, folded, IMAGE)


class ReadsOutsideTheGraph(nn.Module):
    """A training BN's statistics read where torch.fx cannot make them a graph value: through
    a second name (a plain tensor attribute, the module's ``_buffers``), or into a number."""

    def __init__(self, spelling: str):
        super().__init__()
        self.bn, self.spelling = nn.BatchNorm2d(CHANNELS), spelling
        if spelling == "plain attribute":
            self.stats = self.bn.running_mean

    def forward(self, x):
        y = self.bn(x)
        if self.spelling == "plain attribute":
            return y + 2 * _channel(self.stats)
        if self.spelling == "_buffers":
            return y + _channel(self.bn._buffers[MEAN].exp())
        return y * float(self.bn.running_mean[1])


@pytest.mark.parametrize("spelling", ["plain attribute", "_buffers", "float()"])
def test_a_read_torch_fx_cannot_make_a_graph_value_is_refused_or_exact(spelling):
    """torch.fx refuses it, naming the tensor; with example inputs, ``capture="auto"`` goes on
    to torch.export (or runs the model as it is), and the fold is exact."""
    model = ReadsOutsideTheGraph(spelling)
    model = _trained(model, model.bn)  # (in place: ``stats`` still names the same memory)
    shape = (2, CHANNELS, 5, 5)
    named = "stats" if spelling == "plain attribute" else "running_mean"
    for examples, capture in [(False, "fx"), (True, "fx"), (False, "auto")]:
        with pytest.raises(repfx.CaptureError, match=named):
            _fold(model, examples, capture, shape)
    folded = _fold(model, True, "auto", shape)
    _agree_call_after_call(model, folded, shape)


class WritesATensorItCreates(nn.Module):
    """A tensor created in the forward (not the module's), written in place with a graph value:
    torch.fx stores it as a constant, which must not carry one run's write into the next."""

    def __init__(self, read_after_write: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, CHANNELS, 3, padding=1), nn.BatchNorm2d(CHANNELS)
        self.read_after_write = read_after_write

    def forward(self, x):
        y = self.bn(self.conv(x))
        shift = torch.zeros(CHANNELS)
        doubled = shift.view(2, 2)  # (a view while tracing: stays the same memory)
        shift += y.mean()
        if self.read_after_write:  # computed while tracing, from the value before the write
            return y + _channel(shift) + (doubled * 2).sum()
        return y + _channel(shift)


def test_a_tensor_the_forward_creates_and_writes_starts_afresh_on_every_run():
    model = _trained(WritesATensorItCreates(read_after_write=False))
    for examples, capture in FRONT_ENDS.values():
        folded = _fold(model, examples, capture, IMAGE)
        _agree_call_after_call(model, folded, IMAGE)
        assert folded.meta[repfx.REPORT_KEY].counts().get("fold_bn", 0) == 1


def test_a_value_computed_while_tracing_from_a_tensor_the_graph_writes_is_refused():
    """torch.fx would keep the value the tensor held before the write: refused by torch.fx;
    with example inputs, ``capture="auto"`` goes on to torch.export, and the fold is exact."""
    model = _trained(WritesATensorItCreates(read_after_write=True))
    with pytest.raises(repfx.CaptureError, match="a tensor it creates and writes in place"):
        _fold(model, False, "auto", IMAGE)
    folded = _fold(model, True, "auto", IMAGE)
    _agree_call_after_call(model, folded, IMAGE)


class Repro(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(x) + 2 * self.bn.running_mean.view(1, -1, 1, 1)


def test_the_reported_case_folds_and_verifies_with_example_inputs():
    model = Repro().eval()
    model.bn.train()
    with torch.no_grad():
        model.bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))
    x = fresh_input(2, 4, 5, 5)
    with pytest.warns(repfx.TrainingModeWarning):
        folded = repfx.fold(model, (x,))  # verified: no VerificationError
    constants = [n.target for n in folded.graph.nodes if n.op == "get_attr"]
    assert not any(c.startswith("_tensor_constant") for c in constants)  # (no frozen value)
    with pytest.warns(repfx.TrainingModeWarning):
        unverified = repfx.fold(model)
    _agree_call_after_call(model, folded, (2, 4, 5, 5))
    _agree_call_after_call(model, unverified, (2, 4, 5, 5))
