"""The ``repfx`` command, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import torch

from repfx.inspect import op_counts


def repfx(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "repfx", *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def test_optimize_builtin_model_writes_a_loadable_folded_model(tmp_path):
    out = tmp_path / "tiny.pt"
    result = repfx("optimize", "riformer_tiny", "--input-shape", "2,3,64,64", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "fold_affine_mixer" in result.stdout
    assert "verification ok" in result.stdout
    folded = torch.load(out, weights_only=False)
    counts = op_counts(folded)
    assert counts["channel_affine"] == 0 and counts["group_norm"] == 9
    assert folded(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt"]  # no temp file left behind


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"precious")
    result = repfx("optimize", "riformer_tiny", "--input-shape", "1,3,32,32", "-o", str(out))
    assert result.returncode == 2
    assert "exists; pass --force" in result.stderr
    assert out.read_bytes() == b"precious"
    forced = repfx(
        "optimize", "riformer_tiny", "--input-shape", "1,3,32,32", "-o", str(out), "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert out.read_bytes() != b"precious"


def test_unknown_model_is_a_one_line_error():
    result = repfx("optimize", "riformer_s13")
    assert result.returncode == 2
    assert "unknown model 'riformer_s13'" in result.stderr and "riformer_s12" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_input_shapes_are_one_line_errors():
    for shape, message in [("1,x", "comma-separated integers"), ("1,3", "does not run on")]:
        result = repfx("optimize", "riformer_tiny", "--input-shape", shape)
        assert result.returncode == 2
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_models_lists_builtin_names():
    result = repfx("models")
    assert result.returncode == 0
    assert {"riformer_s12", "poolformer_m48"} <= set(result.stdout.split())
