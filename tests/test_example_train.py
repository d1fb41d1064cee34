"""A shortened run of examples/train_riformer_tiny.py: imitation improves, folding is exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_riformer_tiny.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("train_riformer_tiny", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the training example is part of the full suite (pytest --full)
def test_short_training_run_imitates_and_folds_exactly():
    torch.set_num_threads(1)
    example = _load_example()
    # --quick: 60 teacher and 60 student steps; λ2·B above the S24 value so the imitation
    # term shows its effect within that budget.
    results = example.main(["--quick", "--silent", "--lambda-out-b", "1e-2"])
    assert results["l_out_last"] < 0.98 * results["l_out_first"]
    assert results["predictions_identical"]
    assert results["folded_accuracy"] == results["accuracy"]
    assert results["token_mixers_after_fold"] == 0
    assert all(torch.isfinite(torch.tensor(v)).all() for v in results["history"].values())


def test_progress_writes_plain_lines_when_stderr_is_not_a_terminal(capsys):
    example = _load_example()
    progress = example.Progress("train", total=100)
    assert not progress.in_place  # pytest captures stderr: not a terminal
    for step in range(1, 101):
        progress.update(step, loss=1.0 / step)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()  # the first step, then one per tenth of the run
    assert len(lines) == 11 and lines[-1].startswith("train [") and " 100/100 " in lines[-1]
