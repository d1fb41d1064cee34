"""Property tests over random models from ``grammar``: equivalence, structure, idempotence,
and the original left untouched."""

from __future__ import annotations

import copy

import torch
from fuzz_oracle import changes, snapshot
from grammar import models
from hypothesis import given, note
from hypothesis import strategies as st

import repfx
from repfx.ir.graph import FLOAT_KEY, RANK_KEY
from repfx.ir.op_kinds import OP_KINDS, op_counts
from repfx.testing import assert_close, assert_equivalent


def _assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    assert not changes(module, before)


def _structure(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts = op_counts(gm)
    return {kind: counts.get(kind, 0) for kind in OP_KINDS}


@given(models(), st.integers(0, 2**31 - 1))
def test_fold_with_example_inputs(model, seed):
    note(f"blocks: {model.blocks}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(model.input_shape, generator=generator)
    before = snapshot(model.module)

    folded = repfx.fold(model.module, (x,))
    report = folded.meta["repfx_report"]
    note(str(report))
    note(report.explain())

    _assert_unchanged(model.module, before)
    assert report.verification.passed
    # exact for every input, not just the example: a new batch size and fresh values
    other = torch.randn((model.input_shape[0] + 1, *model.input_shape[1:]), generator=generator)
    assert_equivalent(model.module, folded, (other,), refold=repfx.fold)
    # and exact in exact arithmetic: the float64 fold of the float64 model
    model64 = copy.deepcopy(model.module).double()
    with torch.no_grad():
        assert_close(repfx.fold(model64, (x.double(),))(other.double()), model64(other.double()))
    expected = {kind: model.expected.get(kind, 0) for kind in OP_KINDS}
    assert _structure(folded) == expected

    again = repfx.fold(folded, (x,))
    assert again.meta["repfx_report"].folded == []
    assert _structure(again) == expected


@given(models(max_blocks=3), st.integers(0, 2**31 - 1))
def test_fold_without_example_inputs(model, seed):
    """Structural inference alone: still exact, and never more ops than the original."""
    note(f"blocks: {model.blocks}")
    x = torch.randn(model.input_shape, generator=torch.Generator().manual_seed(seed))
    before = snapshot(model.module)
    folded = repfx.fold(model.module)
    _assert_unchanged(model.module, before)
    assert_equivalent(model.module, folded, (x,), refold=repfx.fold)
    report = folded.meta["repfx_report"]
    assert report.verification is None
    assert report.after.nodes <= report.before.nodes


def test_fold_does_not_alias_the_original():
    """An in-place update of the original after folding does not leak into the fold."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    folded = repfx.fold(model)
    x = torch.randn(1, 3, 8, 8)
    expected = folded(x).clone()
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert torch.equal(folded(x), expected)


def test_the_folded_graph_keeps_no_working_annotations():
    """The ranks and float flags the passes read are gone from the returned graph's meta."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    folded = repfx.fold(model, torch.randn(2, 3, 8, 8))
    keys = {k for n in folded.graph.nodes for k in n.meta}
    assert keys.isdisjoint({RANK_KEY, FLOAT_KEY})
    assert "tensor_meta" in keys  # what shape propagation records stays


def test_models_strategy_covers_every_block():
    """Guard against the grammar silently losing a block kind."""
    import grammar

    assert set(grammar.BLOCKS) >= {
        "conv_bn",
        "bn_conv",
        "conv_scale",
        "conv_transpose_bn",
        "lone_affines",
        "riformer",
        "channels_last_mlp",
        "token_linear_bn",
        "parallel_branches",
        "sequential_convs",
        "concat_branches",
        "pool_mixer",
        "token_mixer",
        "scaled_residual",
        "last_axis_norm",
        "flatten_linear",
    }
