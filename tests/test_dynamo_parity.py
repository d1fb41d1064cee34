"""The compile backend folds as much as ``repfx.fold``: the graph it hands to its inner compiler
has the same conv / batch-norm / mul / add counts as ``repfx.fold(model, (x,))``.

Dynamo's graphs spell the model differently from repfx's own capture (functional ops with
frozen weights instead of modules, ``torch._C._nn`` builtins, in-place adds it records as
written), and know every shape from their fake tensors; a fold that one front end makes and the
other misses shows up here as a count that differs. Parameters are re-drawn at O(1); the
compiled model must also match eager on a fresh input.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import fx, nn

import repfx
from repfx.dynamo import compile_backend
from repfx.ir.op_kinds import op_counts
from repfx.models import create
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.testing import assert_close

KINDS = ("conv", "batch_norm", "mul", "add")

torch.set_num_threads(1)  # small ops: one thread is faster, and no oversubscription


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _kinds(counts: dict[str, int]) -> dict[str, int]:
    return {kind: counts.get(kind, 0) for kind in KINDS}


def _compiled_graph_counts(model: nn.Module, x: torch.Tensor, fresh: torch.Tensor):
    """Op counts of the graphs the backend hands to its inner compiler for ``x``, summed, and
    its reports; checks the compiled model against eager on ``fresh``."""
    graphs: list[fx.GraphModule] = []

    def inner(gm: fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    backend = compile_backend(inner=inner)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(x)
        first_call = list(graphs), list(backend.reports)
        assert_close(compiled(fresh), model(fresh))
    totals: dict[str, int] = {}
    for gm in first_call[0]:
        for kind, count in op_counts(gm).items():
            totals[kind] = totals.get(kind, 0) + count
    return _kinds(totals), first_call[1]


def _check_parity(model: nn.Module, size: int) -> None:
    model = redraw_foldable_parameters_(model, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    x, fresh = (torch.randn(2, 3, size, size, generator=gen) for _ in range(2))  # no recompile
    folded = _kinds(op_counts(repfx.fold(model, (x,), verify=False)))
    compiled, reports = _compiled_graph_counts(model, x, fresh)
    assert compiled == folded, f"backend {compiled} vs repfx.fold {folded}"
    assert all(r.folded for r in reports if r.before.ops.get("conv")), "a graph was not folded"
    if compiled["batch_norm"]:  # what is left is explained
        assert any(r.skipped for r in reports)


REFERENCE_NETS = ["repvgg_tiny", "acnet_tiny", "dbb_tiny", "mobileone_tiny", "riformer_tiny"]


@pytest.mark.parametrize("name", REFERENCE_NETS)
def test_backend_folds_the_reference_nets_as_fold_does(name):
    _check_parity(create(name), 32)


@pytest.mark.slow
def test_backend_folds_riformer_s12_as_fold_does():
    _check_parity(create("riformer_s12"), 64)


TIMM_MODELS = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "resnet50"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_backend_folds_timm_models_as_fold_does(name):
    _check_parity(timm.create_model(name, num_classes=10), 64)
