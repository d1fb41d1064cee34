"""The ``repfx`` command, run as a real subprocess (``python -m repfx``).

Every SOURCE kind, every output format and every documented error is exercised through the
command itself; each written file is loaded back with its format's loader and compared with the
original model. Error cases that fail fast run as parallel subprocesses (each one imports
torch, which dominates its run time).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from grammar import randomise_
from torch import nn

from repfx import export as repfx_export
from repfx import models as builtin_models
from repfx.cli import (
    Terminated,
    UsageError,
    build_parser,
    check_output_path,
    main,
    parse_shape,
    sigterm_as_interrupt,
)
from repfx.cli import optimize as cli_optimize
from repfx.ir.op_kinds import op_counts
from repfx.sources import UnknownModelError
from repfx.testing import assert_close

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ("--input-shape", "1,3,32,32")  # riformer_tiny's smallest comfortable input

USER_MODELS = '''
import torch
from torch import nn

COUNTER = {"calls": 0}


def tiny():
    """A seeded conv-BN-ReLU-pool-linear model with O(1) BN statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].weight.data.normal_()
    return model


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow in the top-level forward
            return self.conv(x)
        return -self.conv(x)


class Counter(nn.Module):
    """Scales by how often any Counter ran: tracing bakes in a constant the eager model
    no longer computes, so the folded model differs from the original."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        COUNTER["calls"] += 1
        return self.conv(x) * COUNTER["calls"]


def untraceable():
    return Untraceable()


def counter():
    return Counter()
'''


@dataclass
class Call:
    args: tuple[str, ...]
    cwd: Path | None = None


REPFX = (sys.executable, "-m", "repfx")


def strict(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result``, once it is known that no rewrite was rejected in it: a rejected rewrite is a
    repfx bug, which fails the test (as pyproject.toml's filterwarnings does in this process)."""
    assert "RewriteRejectedWarning" not in result.stderr, result.stderr
    return result


def repfx(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return strict(
        subprocess.run(
            [*REPFX, *args], capture_output=True, text=True, cwd=cwd, env=ENV, check=False
        )
    )


def repfx_many(calls: list[Call], parallel: int = 4) -> list[subprocess.CompletedProcess]:
    """Run several ``repfx`` commands, ``parallel`` at a time; results in order."""
    results: list[subprocess.CompletedProcess] = []
    for start in range(0, len(calls), parallel):
        procs = [
            subprocess.Popen(
                [*REPFX, *c.args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=c.cwd,
                env=ENV,
            )
            for c in calls[start : start + parallel]
        ]
        for p in procs:
            out, err = p.communicate()
            results.append(strict(subprocess.CompletedProcess(p.args, p.returncode, out, err)))
    return results


def one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("repfx: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]


@pytest.fixture(scope="module")
def riformer() -> nn.Module:
    """riformer_tiny with O(1) parameters (its LayerScale init of 1e-5 would hide a bad fold)."""
    return randomise_(
        builtin_models.create("riformer_tiny"), torch.Generator().manual_seed(0)
    ).eval()


@pytest.fixture
def user_models(tmp_path) -> Path:
    (tmp_path / "usermodels.py").write_text(textwrap.dedent(USER_MODELS))
    return tmp_path


def x_for(shape=(1, 3, 32, 32), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


# ------------------------------------------------------------------ SOURCE kinds and formats


def test_builtin_model_to_pt(tmp_path):
    out = tmp_path / "tiny.pt"
    out.write_bytes(b"precious")
    args = ("optimize", "riformer_tiny", *TINY, "-o", str(out), "--explain", "--all", "--force")
    result = repfx(*args)
    assert result.returncode == 0, result.stderr
    assert "fold_affine_mixer" in result.stdout
    assert "verification ok (as given)" in result.stdout
    assert "verification ok (re-drawn parameters)" in result.stdout  # a copy re-drawn at O(1)
    assert "reloaded with torch.load" in result.stdout
    assert "not folded (every candidate), with reasons:" in result.stdout
    assert "merge_branches:" in result.stdout  # the residual sums around the norms
    assert "repfx: tracing and folding, verifying on 1×3×32×32 ..." in result.stderr  # progress
    folded = torch.load(out, weights_only=False)
    counts = op_counts(folded)
    assert counts["channel_affine"] == 0 and counts["group_norm"] == 9
    assert folded(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt"]  # no temp file left behind


def test_fold_norm_affine_leaves_affine_free_norms(tmp_path):
    """riformer_tiny (one block per stage, four stages): each block's norm2 is read by fc1
    alone, so it gives its γ, β to fc1."""
    outs = {flag: tmp_path / f"tiny{flag}.pt" for flag in ("", "--fold-norm-affine")}
    for flag, out in outs.items():
        args = ["optimize", "riformer_tiny", *TINY, "-o", str(out), "-q"]
        assert main([*args, flag] if flag else args) == 0
    plain, moved = (torch.load(out, weights_only=False) for out in outs.values())
    free = [m for m in moved.modules() if isinstance(m, nn.GroupNorm) and m.weight is None]
    assert len(free) == 4
    assert all(m.weight is not None for m in plain.modules() if isinstance(m, nn.GroupNorm))
    # (exit status 0: each fold was verified against its model, which the CLI built itself)


@pytest.mark.slow
def test_state_dict_with_arch_to_pt2_matches_the_original(tmp_path, riformer):
    weights, out = tmp_path / "weights.pth", tmp_path / "folded.pt2"
    torch.save(riformer.state_dict(), weights)
    result = repfx(
        "optimize", str(weights), "--arch", "riformer_tiny", *TINY, "-o", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is one JSON document, progress is on stderr
    assert report["kind"] == "state_dict" and report["input_shapes"] == [[1, 3, 32, 32]]
    assert report["folded"]["fold_affine_mixer"] == 4
    assert report["before"]["ops"]["channel_affine"] == 8
    assert report["after"]["ops"].get("channel_affine", 0) == 0
    assert report["verification"]["passed"] is True
    assert report["output"]["format"] == "pt2"
    assert report["output"]["check"]["runner"] == "torch.export.load"
    assert report["output"]["check"]["passed"] is True
    assert {"rule", "where", "reason"} <= set(report["skipped"][0])
    loaded = torch.export.load(out).module()
    x = x_for()
    with torch.no_grad():
        assert_close(loaded(x), riformer(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.pt2", "weights.pth"]


@pytest.mark.slow
def test_safetensors_to_onnx_reports_node_counts(tmp_path, riformer):
    import onnxruntime as ort
    import safetensors.torch as safetensors_torch

    weights, out = tmp_path / "weights.safetensors", tmp_path / "folded.onnx"
    safetensors_torch.save_file(riformer.state_dict(), str(weights))
    result = repfx("optimize", str(weights), "--arch", "riformer_tiny", *TINY, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "reloaded with onnxruntime" in result.stdout
    assert "nodes" in result.stdout and "(unfolded -> folded)" in result.stdout
    assert "Sub" in result.stdout  # the mixer's subtraction: 4 -> 0
    assert "repfx: exporting to ONNX" in result.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = x_for()
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), riformer(x))


@pytest.mark.slow
def test_timm_with_weights_default_shape_and_dtype(tmp_path):
    import timm

    model = randomise_(timm.create_model("test_resnet"), torch.Generator().manual_seed(0)).eval()
    weights, out = tmp_path / "resnet.pt", tmp_path / "resnet.folded.pt"
    torch.save(model.state_dict(), weights)
    result = repfx(
        "optimize", "timm:test_resnet", "--weights", str(weights), "--dtype", "float64",
        "-o", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "timm" and report["dtype"] == "float64"
    assert report["input_shapes"] == [[1, 3, 160, 160]]  # from timm's pretrained_cfg
    assert report["before"]["ops"]["batch_norm"] > 0
    assert report["after"]["ops"].get("batch_norm", 0) == 0
    folded = torch.load(out, weights_only=False)
    x = x_for((2, 3, 64, 64), torch.float64)
    with torch.no_grad():
        assert_close(folded(x), model.double()(x))


def test_factory_source_with_benchmark(user_models):
    out = user_models / "tiny.folded.pt"
    result = repfx(
        "optimize", "usermodels:tiny", "--input-shape", "2,3,16,16", "-o", str(out),
        "--benchmark", "--benchmark-rounds", "3", cwd=user_models,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fold_bn" in result.stdout
    assert "median of 3 interleaved rounds" in result.stdout
    sys.path.insert(0, str(user_models))
    try:
        import usermodels

        original = usermodels.tiny().eval()
    finally:
        sys.path.remove(str(user_models))
        sys.modules.pop("usermodels", None)
    folded = torch.load(out, weights_only=False)
    x = x_for((2, 3, 16, 16))
    with torch.no_grad():
        assert_close(folded(x), original(x))


def test_trusted_pickled_module_to_pt(tmp_path, riformer):
    source, out = tmp_path / "model.pt", tmp_path / "model.folded.pt"
    torch.save(riformer, source)
    trusted = repfx("optimize", str(source), *TINY, "-o", str(out), "--trust-pickle", "-q")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stderr == ""  # --quiet: no progress messages
    folded = torch.load(out, weights_only=False)
    x = x_for()
    with torch.no_grad():
        assert_close(folded(x), riformer(x))


class _Payload:
    """Unpickling this runs ``exec``: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_crafted_pickle_is_not_executed_without_the_flag(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    zipped, raw = tmp_path / "evil.pt", tmp_path / "evil.pth"
    torch.save(_Payload(marker), zipped)  # torch's zip format
    with raw.open("wb") as f:
        pickle.dump(_Payload(marker), f, protocol=4)  # a bare pickle (FRAME opcodes)
    refused = repfx("optimize", str(zipped), "-o", str(tmp_path / "a.pt"), "-q")
    one_line_error(refused, 5, "would run arbitrary code from the file, so repfx refuses")
    assert "(it references exec)" in refused.stderr  # what the pickle would have called
    # The bare pickle and the --weights / --arch routes refuse it too (in-process: faster).
    for args in (
        [str(raw), "-o", str(tmp_path / "b.pt")],
        [str(raw), "--arch", "riformer_tiny"],
        ["riformer_tiny", "--weights", str(zipped)],
    ):
        assert main(["optimize", *args, "-q"]) == 5
        assert "arbitrary code" in capsys.readouterr().err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "evil.pth"]
    # With --trust-pickle the payload does run: the marker check above is meaningful.
    assert main(["optimize", str(zipped), "--trust-pickle", "-q"]) == 4
    assert marker.read_text() == "pwned"
    assert "not a model or a state dict" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- errors


@pytest.mark.slow
def test_errors_are_one_line_with_documented_exit_codes(tmp_path, user_models, riformer):
    """The issue's error list, each through the real command (in parallel)."""
    weights = tmp_path / "weights.pt"
    torch.save(riformer.state_dict(), weights)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    no_write = tmp_path / "never.pt"
    cases = [
        # (arguments, exit code, message)
        (("optimize", str(tmp_path / "missing.pt"), "--arch", "riformer_tiny"), 4,
         "no such file"),
        (("optimize", str(garbage), "--arch", "riformer_tiny"), 4,
         "not a PyTorch file or it is corrupt"),
        (("optimize", "riformer_s13", "--json"), 2, "unknown model 'riformer_s13'. Did you mean"),
        (("optimize", "riformer_tiny", "--input-shape", "1,3"), 2,
         "wrong --input-shape 1,3 for riformer_tiny: the model does not run on"),
        (("optimize", "usermodels:untraceable", "--input-shape", "1,3,8,8", "--capture", "fx"),
         3, "cannot trace Untraceable.forward"),
        (("optimize", "usermodels:counter", "--input-shape", "1,3,8,8", "-o", str(no_write)), 1,
         "verification failed: the folded model differs"),
    ]  # fmt: skip
    calls = [Call((*args, "-q"), cwd=user_models) for args, _, _ in cases]
    *results, listed = repfx_many([*calls, Call(("--list",))], parallel=3)
    for (_, code, message), result in zip(cases, results, strict=True):
        one_line_error(result, code, message)
    assert not no_write.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files
    payload = json.loads(results[2].stdout)  # --json: the error as JSON on stdout, too
    assert payload["exit_code"] == 2 and "unknown model" in payload["error"]
    assert "verification FAILED" in results[5].stdout  # the report says where it stands
    assert listed.returncode == 0
    assert {"riformer_s12", "poolformer_m48", "riformer_tiny"} <= set(listed.stdout.split())


def test_more_errors_in_process(tmp_path, user_models, riformer, capsys, monkeypatch):
    """Further error branches, through ``repfx.cli.main`` itself (no torch import per case)."""
    monkeypatch.chdir(user_models)
    monkeypatch.setattr(sys, "path", [*sys.path])  # the factory loader makes cwd importable
    weights = tmp_path / "weights.pt"
    torch.save(riformer.state_dict(), weights)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[:300])
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"precious")
    cases = [
        (["riformer_tiny", "--input-shape", "1,x"], 2, "comma-separated integers"),
        (["riformer_tiny", "--input-shape", "1,0,3"], 2, "every dimension must be positive"),
        (["riformer_tiny", *TINY, "-o", str(existing)], 2, "exists; pass --force"),
        ([str(truncated), "--arch", "riformer_tiny"], 4, "corrupt"),
        ([str(bad_safetensors), "--arch", "riformer_tiny"], 4,
         "not a safetensors file or it is corrupt"),
        ([str(weights), "--arch", "poolformer_tiny", *TINY], 4,
         "do not fit poolformer_tiny: unexpected network.0.0.token_mixer"),
        ([str(weights), *TINY], 2, "holds a state dict (weights only); pass --arch"),
        (["riformer_tiny", "--arch", "riformer_tiny"], 2, "use --weights FILE"),
        ([str(weights), "--arch", "riformer_tiny", "-o", str(weights), "--force"], 2,
         "repfx never overwrites it"),
        (["riformer_tiny", "-o", str(tmp_path / "out.h5")], 2, "cannot tell the format"),
        (["riformer_tiny", "--format", "onnx"], 2, "--format needs an output file"),
        (["usermodels:tiny", "-o", str(tmp_path / "t.onnx")], 2,
         "cannot infer the input shape of usermodels:tiny"),
        (["usermodels:nothing"], 4, "has no attribute 'nothing'"),
        (["nomodule:build"], 4, "cannot import 'nomodule'"),
        (["timm:resnet_5O"], 2, "unknown timm model 'resnet_5O'"),
        ([], 2, "optimize needs a SOURCE"),
    ]  # fmt: skip
    for args, code, message in cases:
        assert main(["optimize", *args, "-q"]) == code, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    for debug in (["--debug", "optimize"], ["optimize", "--debug"]):
        # --debug adds the traceback and keeps the error's exit code (not Python's 1).
        assert main([*debug, "riformer_s13"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and UnknownModelError.__name__ in err
        errors = [line for line in err.splitlines() if line.startswith("repfx: error:")]
        assert len(errors) == 1 and "unknown model 'riformer_s13'" in errors[0], err
    sys.modules.pop("usermodels", None)
    assert existing.read_bytes() == b"precious"
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert written == [
        "bad.safetensors",
        "existing.pt",
        "truncated.pt",
        "usermodels.py",
        "weights.pt",
    ]


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory in which nothing can be created: read-only for a normal user; for root
    (whom permissions do not stop) ``/proc``, whose entries only the kernel makes."""
    if os.geteuid() == 0:
        return Path("/proc")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    return read_only


def test_user_errors_are_not_internal_errors(tmp_path, monkeypatch, capsys):
    """Wrong input shapes and an unwritable OUT are usage errors (2), never "a repfx bug"."""
    monkeypatch.chdir(tmp_path)
    unwritable = unwritable_directory(tmp_path)
    huge = "1,3,10000000,10000000"  # 1.2 PB: more than any machine's memory or address space
    cases = [
        (["--input-shape", "1,3,32,32", "--input-shape", "1,3,32,32"], 2,
         "2 example inputs given, but RIFormer.forward(x) cannot take them"),
        (["--input-shape", huge], 2, "the input is too large: 1.2e+06 GB of float32"),
        (["--input-shape", "99999999999999999999"], 2, "the input is too large"),
        (["--input-shape", "4611686018427387904,4"], 2, "the input is too large"),
        ([*TINY, "-o", str(unwritable / "out.pt")], 2, f"cannot write into {unwritable}"),
        ([*TINY, "-o", "/nonexistent-dir/out.pt"], 2, "directory /nonexistent-dir does not"),
    ]  # fmt: skip
    for args, code, message in cases:
        assert main(["optimize", "riformer_tiny", *args, "-q"]) == code, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    # Where the size is not known to exceed the memory, the failed allocation says the same.
    monkeypatch.setattr("repfx.cli.example_inputs._physical_memory", lambda: None)
    assert main(["optimize", "riformer_tiny", "--input-shape", huge, "-q"]) == 2
    err = capsys.readouterr().err
    assert "the input is too large: 1.2e+06 GB could not be allocated" in err, err
    assert list(tmp_path.iterdir()) == ([] if unwritable.name == "proc" else [unwritable])


class _RunsCommand:
    """Unpickling this calls ``os.system``, whose module the weights-only unpickler blocks
    with a message of its own (no ``Unsupported global``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_zip_pickle_of_a_blocked_global_is_refused_not_corrupt(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    source = tmp_path / "object.pt"
    torch.save(_RunsCommand(marker), source)  # torch's zip format
    assert main(["optimize", str(source), "-q"]) == 5
    err = capsys.readouterr().err
    assert "(it references posix.system)" in err or "(it references os.system)" in err, err
    assert "pass --trust-pickle" in err
    assert not marker.exists()


def test_factory_that_exits_is_an_error(user_models, monkeypatch, capsys):
    monkeypatch.chdir(user_models)
    monkeypatch.setattr(sys, "path", [*sys.path])
    (user_models / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    cases = [
        ("sys:exit", "sys:exit() exited (SystemExit(None)) instead of returning a model"),
        ("exits_on_import:build", "importing 'exits_on_import' failed: SystemExit: 3"),
    ]
    for source, message in cases:
        assert main(["optimize", source, "-q"]) == 4, source
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"repfx: error: {message}"], err
    sys.modules.pop("exits_on_import", None)


@pytest.mark.slow
def test_onnx_external_data_is_not_overwritten_without_force(tmp_path, monkeypatch, capsys):
    """ONNX's ``OUT.onnx.data`` sidecar is protected like OUT itself."""
    import onnxruntime as ort

    monkeypatch.setattr(repfx_export, "ONNX_EXTERNAL_DATA_BYTES", 0)  # always external data
    out, sidecar = tmp_path / "tiny.onnx", tmp_path / "tiny.onnx.data"
    sidecar.write_bytes(b"precious")
    assert main(["optimize", "riformer_tiny", *TINY, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"repfx: error: {sidecar} exists; pass --force to overwrite it"], err
    assert sidecar.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx.data"]  # no OUT, no temp dir
    assert main(["optimize", "riformer_tiny", *TINY, "-o", str(out), "-q", "--force"]) == 0
    assert sidecar.read_bytes() != b"precious"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = x_for()
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model = builtin_models.create("riformer_tiny").eval()
    with torch.no_grad():
        expected = model(x)
    assert got.shape == tuple(expected.shape) == (1, 1000)


def test_out_must_be_a_regular_file_and_a_link_is_replaced_not_followed(tmp_path, capsys):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    target = tmp_path / "target.pt"
    target.write_bytes(b"precious")
    link, dangling = tmp_path / "link.pt", tmp_path / "dangling.pt"
    link.symlink_to(target)
    dangling.symlink_to(tmp_path / "nowhere.pt")
    directory = tmp_path / "directory.pt"
    directory.mkdir()
    cases = [
        ([str(fifo), "--force"], "is not a regular file (a device, pipe or socket)"),
        ([str(directory), "--force"], "is a directory"),
        ([str(link)], f"{link} exists (a symbolic link); pass --force"),
        ([str(dangling)], f"{dangling} exists (a symbolic link); pass --force"),
    ]
    for args, message in cases:
        assert main(["optimize", "riformer_tiny", *TINY, "-q", "-o", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert main(["optimize", "riformer_tiny", *TINY, "-q", "-o", str(link), "--force"]) == 0
    assert not link.is_symlink() and link.stat().st_size > 1000  # the link was replaced
    assert target.read_bytes() == b"precious"  # and its target left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.pt",
        "directory.pt",
        "link.pt",
        "pipe.pt",
        "target.pt",
    ]
    # A device is refused before anything runs (checked on the arguments: nothing is written).
    args = build_parser().parse_args(
        ["optimize", "riformer_tiny", "-o", os.devnull, "--format", "pt", "--force"]
    )
    with pytest.raises(UsageError, match="is not a regular file"):
        check_output_path(args)


def test_sigterm_raises_terminated_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once; this is never reached
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_during_a_write_removes_the_temporary_files(tmp_path):
    """SIGTERM while the ONNX export writes into its temporary directory: exit 143, and the
    ``.OUT.XXXX`` directory is gone, as after Ctrl-C."""
    out = tmp_path / "tiny.onnx"
    proc = subprocess.Popen(
        [*REPFX, "optimize", "riformer_tiny", *TINY, "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        for line in proc.stderr:  # progress: the export (into the temporary directory) starts
            if line.startswith("repfx: exporting to ONNX"):
                break
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tiny.onnx.*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(tmp_path.glob(".tiny.onnx.*")), "the export did not start"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "repfx: terminated" in err
    assert list(tmp_path.iterdir()) == []


def test_training_checkpoint_with_data_parallel_prefix(tmp_path, riformer, capsys):
    checkpoint = tmp_path / "epoch3.ckpt"
    state = {f"module.{k}": v for k, v in riformer.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": 0.1}}, checkpoint)
    out = tmp_path / "folded.pt"
    assert (
        main(["optimize", str(checkpoint), "--arch", "riformer_tiny", *TINY, "-o", str(out)]) == 0
    )
    assert "verification ok" in capsys.readouterr().out
    x = x_for()
    with torch.no_grad():
        assert_close(torch.load(out, weights_only=False)(x), riformer(x))


def test_console_script_is_the_same_command():
    script = Path(sys.executable).with_name("repfx")
    assert script.exists(), "pip install -e '.[test]' installs the repfx console script"
    result = subprocess.run(
        [str(script), "models"], capture_output=True, text=True, env=ENV, check=False
    )
    assert result.returncode == 0
    assert "riformer_s12" in result.stdout.split()


def test_each_step_reports_its_duration_and_the_report_the_whole_run(capsys):
    assert main(["optimize", "riformer_tiny", *TINY]) == 0
    captured = capsys.readouterr()
    steps = [line for line in captured.err.splitlines() if line.startswith("repfx: ")]
    assert steps[0] == "repfx: loading riformer_tiny ..."
    assert re.fullmatch(r"repfx: loading riformer_tiny: \d+\.\d s", steps[1])
    assert re.fullmatch(r"repfx: tracing and folding, verifying on 1×3×32×32: \d+\.\d s", steps[-1])
    assert re.search(r"time: fold \d+\.\d s, whole run \d+\.\d s", captured.out)


def test_picture_arguments_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """A wrong ``--graph`` / ``--graph-block`` is a usage error before the model is loaded
    (a name that is not a module of the model: before it is folded), with what is accepted."""

    def no_work(*args, **kwargs):
        raise AssertionError("slow work started before the arguments were checked")

    monkeypatch.setattr(cli_optimize, "load_source", no_work)
    cases = [
        (["--graph", str(tmp_path / "g.xyz")], "cannot draw a .xyz file; name the picture with "
         "one of .svg, .png, .pdf, .jpg"),
        (["--graph", str(tmp_path / "g")], "cannot draw a suffix-less file"),
        (["--graph-block", "network.0.0"], "--graph-block needs a picture to draw into"),
        (["--graph", str(tmp_path / "missing" / "g.png")], "does not exist"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(["optimize", "riformer_tiny", *TINY, "-q", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["optimize", "riformer_tiny", "-q", "--graph", str(tmp_path / "g.svg")]) == 2
    assert "pip install 'repfx[draw]'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(cli_optimize, "fold", no_work)
    args = ["--graph", str(tmp_path / "g.svg"), "--graph-block", "network.0.O"]
    assert main(["optimize", "riformer_tiny", *TINY, "-q", *args]) == 2
    err = capsys.readouterr().err
    assert "has no module of that name; did you mean network.0.0" in err
    assert list(tmp_path.iterdir()) == []


def test_help_is_plain_text_and_documents_every_option(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "``" not in capsys.readouterr().out  # no reStructuredText markup
    optimize = next(
        action.choices["optimize"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    documented = [a for a in optimize._actions if a.help != argparse.SUPPRESS]
    assert all(a.help for a in documented), [a.dest for a in documented if not a.help]
    shape = next(a for a in documented if a.dest == "input_shape")
    assert "1x3x224x224" in shape.help  # both spellings parse_shape accepts
    assert parse_shape("1x3x224x224") == parse_shape("1,3,224,224") == (1, 3, 224, 224)
