"""The pipeline around the passes: what a pass is by default, the state it is handed (the
rewrites it must not retry), strict mode as an argument, the ``repfx.passes`` logger and the
time each pass took."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import traced, wrong_output_fold
from torch import fx, nn

import repfx
from repfx.passes import (
    Cleanup,
    FoldBatchNorm,
    FoldNormAffine,
    Pass,
    PassResult,
    PipelineState,
    RewriteRejected,
    RewriteRejectedWarning,
    default_pipeline,
    run_to_fixpoint,
)
from repfx.passes import _absorb as absorb_module
from repfx.passes.base import DENIED, rule_words


def _conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
        model[1].running_mean.copy_(torch.randn(4, generator=gen))
        model[1].running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    return model.eval()


class Nothing(Pass):
    name = "nothing"

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        return PassResult(modified=False)


def test_a_pass_has_words_and_runs_repeatedly_unless_it_says():
    assert Nothing().words == "nothing" and not Nothing().runs_once
    assert FoldBatchNorm().words == "batch norm folded"
    assert FoldNormAffine().runs_once
    assert rule_words([Nothing(), Cleanup()]) == {"nothing": "nothing", "cleanup": "no-op removed"}


def test_a_denied_rewrite_is_refused_by_the_state_the_pass_is_handed():
    gm = traced(_conv_bn())
    result = FoldBatchNorm()(gm, PipelineState(frozenset({("fold_bn", "1")})))
    assert not result.modified
    assert [(s.where, s.reason) for s in result.skipped] == [("1", DENIED)]
    assert FoldBatchNorm()(gm).modified  # handed nothing, nothing is denied
    assert "repfx_denied" not in gm.meta  # the state travels as an argument, not in the graph


def test_strict_is_an_argument_and_otherwise_a_rejection_warns(monkeypatch):
    monkeypatch.setattr(absorb_module, "fold_affine_into_conv_output", wrong_output_fold)
    with pytest.raises(RewriteRejected, match="fold_bn at 1"):
        run_to_fixpoint(traced(_conv_bn()), default_pipeline(), strict=True)
    with pytest.warns(RewriteRejectedWarning, match="fold_bn at 1: .*a repfx bug"):
        fixpoint = run_to_fixpoint(traced(_conv_bn()), default_pipeline())
    assert all(f.rule != "fold_bn" for f in fixpoint.folded)
    assert any(s.where == "1" and "rejected" in s.reason for s in fixpoint.skipped)


def test_the_passes_log_each_run_and_each_commit_at_debug_level_only(caplog):
    with caplog.at_level(logging.INFO, logger="repfx.passes"):
        run_to_fixpoint(traced(_conv_bn()), default_pipeline())
    assert not caplog.records
    with caplog.at_level(logging.DEBUG, logger="repfx.passes"):
        run_to_fixpoint(traced(_conv_bn()), default_pipeline())
    lines = [r.getMessage() for r in caplog.records if r.name == "repfx.passes"]
    assert "commit fold_bn at 1: proven" in lines
    runs = [line for line in lines if line.startswith("pass fold_bn: ")]
    assert runs[0].startswith("pass fold_bn: 1 folded, 0 skipped, ") and runs[0].endswith(" s")
    assert {line.split(":")[0] for line in lines if line.startswith("pass ")} == {
        f"pass {p.name}" for p in default_pipeline()
    }


def test_each_pass_is_timed_and_the_report_says_so():
    fixpoint = run_to_fixpoint(traced(_conv_bn()), default_pipeline())
    assert set(fixpoint.seconds) == {p.name for p in default_pipeline()}
    assert all(s >= 0 for s in fixpoint.seconds.values())
    report = repfx.fold(_conv_bn(), (torch.randn(1, 3, 5, 5),)).meta[repfx.REPORT_KEY]
    assert set(report.pass_seconds) == set(fixpoint.seconds)
    assert report.to_dict()["pass_seconds"] == report.pass_seconds
    last = str(report).splitlines()[-1]
    assert last.startswith("  time per pass: ") and "fold_bn " in last and last.endswith(" s")
