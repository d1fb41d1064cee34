"""The public API's errors: one root class, and no silent no-op on a model in training mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import repfx
from repfx.capture import CaptureError, ExampleInputError
from repfx.passes.base import PassError, RewriteRejected
from repfx.passes.rewrite import GraphSurgeryError
from repfx.sources import SourceError


def _conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "error",
    [
        CaptureError,
        ExampleInputError,
        repfx.VerificationError,
        repfx.TrainingModeError,
        PassError,
        RewriteRejected,
        GraphSurgeryError,
        repfx.ExportError,
        SourceError,
    ],
)
def test_every_repfx_error_is_a_repfx_error(error):
    assert issubclass(error, repfx.Error)


def test_errors_keep_the_builtin_class_they_refine():
    assert issubclass(repfx.VerificationError, AssertionError)
    assert issubclass(CaptureError, RuntimeError) and issubclass(ExampleInputError, ValueError)


def test_an_input_the_model_does_not_run_on_is_caught_as_a_repfx_error():
    with pytest.raises(repfx.Error, match="does not run on the example inputs"):
        repfx.fold(_conv_bn().eval(), (torch.randn(2, 5, 8, 8),))


def test_folding_a_model_in_training_mode_warns_and_says_what_to_do():
    model = _conv_bn().train()
    with pytest.warns(repfx.TrainingModeWarning, match=r"model\.eval\(\)") as record:
        folded = repfx.fold(model, (torch.randn(2, 3, 8, 8),))
    assert len(record) == 1  # the verification's own folds do not warn again
    assert "'1'" in str(record[0].message)  # names a module in training mode
    assert folded.meta[repfx.REPORT_KEY].folded == []  # training-mode BN is kept


def test_strict_fold_of_a_model_in_training_mode_raises():
    with pytest.raises(repfx.TrainingModeError, match="training mode"):
        repfx.fold(_conv_bn().train(), strict=True)


def test_an_eval_model_folds_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", repfx.TrainingModeWarning)
        folded = repfx.fold(_conv_bn().eval(), (torch.randn(2, 3, 8, 8),))
    assert folded.meta[repfx.REPORT_KEY].counts() == {"fold_bn": 1}


def test_more_example_inputs_than_the_forward_takes_is_an_input_error():
    model = _conv_bn().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(
        repfx.ExampleInputError, match="2 example inputs for a forward that takes 1"
    ):
        repfx.fold(model, (x, x))
