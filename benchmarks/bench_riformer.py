"""Eager CPU inference latency of RIFormer in four forms, measured interleaved.

Variants, all built from ONE set of random weights (so they compute the same function):

- ``training``      the training form: ``x + ls1 * (A(N1(x)) - N1(x))`` with an affine mixer;
- ``paper_deploy``  the paper's hand-written reparameterization (``switch_to_deploy()``):
                    mixer folded into ``norm1``, LayerScale multiplies kept;
- ``repfx``         ``repfx.fold(training, (x,))`` with verification on;
- ``ideal``         the hand-folded ideal (``deploy_ideal()``): mixer and both LayerScales
                    folded (into ``norm1`` and ``mlp.fc2``).

Method:

1. Build the model, then re-draw every LayerScale, norm affine and token-mixer affine at O(1)
   (the published init of 1e-5 would make a wrong fold invisible). Build the four variants
   from copies of it and assert with ``repfx.testing.assert_close`` that their outputs
   agree with the training form on the benchmark input.
2. Under ``torch.inference_mode()`` (models in eval mode), run a few warm-up forwards of each
   variant, then ``--rounds`` rounds. Each round times one forward of every variant with
   ``time.perf_counter``, round-robin, rotating the starting variant each round, so slow
   phases of a shared machine hit all variants alike.
3. Report, per variant, the median latency and its inter-quartile range (IQR), and for each
   ratio of interest the median and IQR of the per-round *paired* ratios (both forwards of a
   pair ran back to back in the same round), next to the plain ratio of medians.
4. Check the targets: repfx <= 0.97x paper deploy, and repfx within 2% of the ideal
   (repfx / ideal <= 1.02; being faster than the ideal also meets it).

Run ``python benchmarks/bench_riformer.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

import repfx
import repfx.models
from repfx.models import RIFormer, RIFormerBlock
from repfx.proof.tolerances import max_errors
from repfx.testing import assert_close

VARIANTS: tuple[str, ...] = ("training", "paper_deploy", "repfx", "ideal")

# (label, numerator, denominator)
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("repfx / paper_deploy", "repfx", "paper_deploy"),
    ("repfx / ideal", "repfx", "ideal"),
    ("paper_deploy / training", "paper_deploy", "training"),
    ("repfx / training", "repfx", "training"),
)

# (description, ratio label, largest ratio that meets the target)
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("repfx-folded <= 0.97x the paper's deploy form", "repfx / paper_deploy", 0.97),
    ("repfx-folded within 2% of the hand-folded ideal", "repfx / ideal", 1.02),
)


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of a sample."""

    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if len(values) < 2:
            only = values[0]
            return cls(only, only, only)
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median, q1, q3)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_latency_args(
        argv,
        "Interleaved eager CPU latency of RIFormer: training / paper deploy / repfx-folded / "
        "hand-folded ideal.",
        family="riformer",
    )


def parse_latency_args(
    argv: Sequence[str] | None, description: str, family: str
) -> argparse.Namespace:
    """The options of an interleaved latency benchmark of one built-in model family (also
    ``bench_poolformer.py``'s): ``--model {family}_*``, batch, size, rounds, threads, ..."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=f"{family}_s12", help=f"{family}_* model name")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height = width (224)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up forwards per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and input")
    parser.add_argument(
        "--markdown", action="store_true", help="also print markdown tables for RESULTS.md"
    )
    args = parser.parse_args(argv)
    if not args.model.startswith(f"{family}_"):
        parser.error(f"--model must be a {family}_* model, got {args.model!r}")
    if min(args.batch, args.size, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batch, --size and --rounds must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo (falls back to ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def interpreter_path() -> str:
    """``sys.executable``, relative to the working directory when it lies below it."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def machine_lines(argv: Sequence[str]) -> list[str]:
    return [
        f"cpu      : {cpu_model()}",
        f"cores    : {os.cpu_count()} logical, {usable_cores()} usable by this process",
        f"python   : {platform.python_version()}",
        f"torch    : {torch.__version__}",
        f"threads  : {torch.get_num_threads()} (torch intra-op)",
        f"command  : {shlex.join([interpreter_path(), *argv])}",
    ]


# --------------------------------------------------------------------------- models


def _uniform_(t: torch.Tensor, low: float, high: float, gen: torch.Generator) -> None:
    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (high - low) + low)


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)


def redraw_block_params_(block: RIFormerBlock, gen: torch.Generator) -> None:
    """In place: LayerScales, norm affines and the token-mixer affine drawn at O(1)."""
    with torch.no_grad():
        for scale in (block.layer_scale_1, block.layer_scale_2):
            _uniform_(scale, 0.5, 1.5, gen)
        for norm in (block.norm1, block.norm2):
            _uniform_(norm.weight, 0.5, 1.5, gen)
            _normal_(norm.bias, 0.5, gen)
        _uniform_(block.token_mixer.affine.weight, 0.5, 1.5, gen)
        _normal_(block.token_mixer.affine.bias, 0.5, gen)


def build_reference(model_name: str, seed: int) -> RIFormer:
    """The training-form model in eval mode, with the foldable params re-drawn at O(1)."""
    torch.manual_seed(seed)
    model = repfx.models.create(model_name)
    if not isinstance(model, RIFormer):
        raise TypeError(f"{model_name} is a {type(model).__name__}, not a RIFormer")
    gen = torch.Generator().manual_seed(seed + 1)
    for block in model.riformer_blocks():
        redraw_block_params_(block, gen)
    with torch.no_grad():
        _uniform_(model.norm.weight, 0.5, 1.5, gen)
        _normal_(model.norm.bias, 0.5, gen)
    return model.eval()


def build_variants(reference: RIFormer, x: torch.Tensor) -> dict[str, nn.Module]:
    """The four variants, each from its own copy of ``reference`` (left unchanged)."""
    training = copy.deepcopy(reference).eval()
    paper = copy.deepcopy(reference).switch_to_deploy().eval()
    ideal = copy.deepcopy(reference).deploy_ideal().eval()
    folded = repfx.fold(training, (x,), verify=True).eval()
    return {"training": training, "paper_deploy": paper, "repfx": folded, "ideal": ideal}


def check_agreement(variants: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    """Assert every variant matches the training form on ``x``; return one line each."""
    lines = []
    with torch.inference_mode():
        expected = variants["training"](x)
        for name, model in variants.items():
            actual = model(x)
            assert_close(actual, expected)
            abs_err, rel_err = max_errors(actual, expected)
            lines.append(f"{name:>13}: max abs {abs_err:.3g}, max rel {rel_err:.3g}")
    return lines


def op_counts(module: nn.Module) -> Counter[str]:
    """Operations of ``module``'s torch.fx graph, keyed by module type or function name."""
    gm = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[type(gm.get_submodule(node.target)).__name__] += 1
        elif node.op in ("call_function", "call_method"):
            counts[getattr(node.target, "__name__", str(node.target))] += 1
    return counts


def structure_lines(variants: dict[str, nn.Module]) -> list[str]:
    """Where the repfx graph differs from the ideal: ops and parameters."""
    folded, ideal = variants["repfx"], variants["ideal"]
    ours, theirs = op_counts(folded), op_counts(ideal)
    lines = [
        f"repfx ops : {dict(sorted(ours.items()))}",
        f"ideal ops : {dict(sorted(theirs.items()))}",
    ]
    extra, missing = ours - theirs, theirs - ours
    lines.append(
        f"only in repfx: {dict(extra) or 'nothing'}; only in ideal: {dict(missing) or 'nothing'}"
    )
    ours_p, theirs_p = dict(folded.named_parameters()), dict(ideal.named_parameters())
    same = ours_p.keys() == theirs_p.keys() and all(
        torch.equal(ours_p[k], theirs_p[k]) for k in ours_p
    )
    lines.append(f"parameters bit-identical to the ideal's (same names): {'yes' if same else 'no'}")
    return lines


# --------------------------------------------------------------------------- timing


def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one forward of ``model`` on ``x``."""
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def rotated(names: Sequence[str], shift: int) -> list[str]:
    shift %= len(names)
    return [*names[shift:], *names[:shift]]


def measure_interleaved(
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    warmup: int,
    rounds: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Per-variant forward latencies (seconds), one sample per variant per round."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                variants[name](x)
        for r in range(rounds):
            for name in rotated(names, r):
                samples[name].append(time_forward(variants[name], x))
            if progress is not None:
                progress(r)
    return samples


def paired_ratios(samples: dict[str, list[float]], num: str, den: str) -> list[float]:
    """Per-round ratios ``num / den`` (both measured in the same round)."""
    return [a / b for a, b in zip(samples[num], samples[den], strict=True)]


def ratio_summaries(
    samples: dict[str, list[float]], ratios: Sequence[tuple[str, str, str]] = RATIOS
) -> dict[str, tuple[Summary, float]]:
    """For each ratio (label, numerator, denominator): (summary of the paired ratios, ratio
    of the medians)."""
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        label: (Summary.of(paired_ratios(samples, num, den)), medians[num] / medians[den])
        for label, num, den in ratios
    }


def target_lines(ratios: dict[str, tuple[Summary, float]]) -> list[str]:
    lines = []
    for description, label, limit in TARGETS:
        paired, _ = ratios[label]
        verdict = "MET" if paired.median <= limit else "NOT MET"
        lines.append(
            f"{description}: {label} = {paired.median:.3f} (target <= {limit:.2f}) -> {verdict}"
        )
    return lines


# --------------------------------------------------------------------------- reporting


def latency_text(samples: dict[str, list[float]]) -> list[str]:
    lines = [f"{'variant':>13}  {'median ms':>10}  {'IQR ms':>8}  {'q1 ms':>8}  {'q3 ms':>8}"]
    for name, values in samples.items():
        s = Summary.of(values)
        lines.append(
            f"{name:>13}  {s.median * 1e3:10.2f}  {s.iqr * 1e3:8.2f}  "
            f"{s.q1 * 1e3:8.2f}  {s.q3 * 1e3:8.2f}"
        )
    return lines


def ratio_text(ratios: dict[str, tuple[Summary, float]]) -> list[str]:
    lines = [f"{'ratio':>24}  {'paired median':>13}  {'paired IQR':>10}  {'of medians':>10}"]
    for label, (paired, of_medians) in ratios.items():
        lines.append(f"{label:>24}  {paired.median:13.3f}  {paired.iqr:10.3f}  {of_medians:10.3f}")
    return lines


def latency_markdown(samples: dict[str, list[float]], batch: int) -> list[str]:
    lines = [
        "| variant | median (ms) | IQR (ms) | q1–q3 (ms) | img/s (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in samples.items():
        s = Summary.of(values)
        lines.append(
            f"| {name} | {s.median * 1e3:.1f} | {s.iqr * 1e3:.1f} | "
            f"{s.q1 * 1e3:.1f}–{s.q3 * 1e3:.1f} | {batch / s.median:.1f} |"
        )
    return lines


def ratio_markdown(ratios: dict[str, tuple[Summary, float]]) -> list[str]:
    lines = [
        "| ratio | paired median | paired IQR (q1–q3) | ratio of medians |",
        "|---|---:|---:|---:|",
    ]
    for label, (paired, of_medians) in ratios.items():
        lines.append(
            f"| {label} | {paired.median:.3f} | {paired.iqr:.3f} "
            f"({paired.q1:.3f}–{paired.q3:.3f}) | {of_medians:.3f} |"
        )
    return lines


def print_section(title: str, lines: Sequence[str]) -> None:
    print(f"\n== {title}")
    for line in lines:
        print(line)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shown_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    print_section("machine", machine_lines(shown_argv))

    reference = build_reference(args.model, args.seed)
    x = torch.randn(
        args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)
    )
    variants = build_variants(reference, x)
    config = (
        f"{args.model}, input {args.batch}x3x{args.size}x{args.size}, float32, seed {args.seed}"
    )
    print_section("config", [config])
    print_section(
        "repfx fold report", str(variants["repfx"].meta[repfx.REPORT_KEY]).splitlines()[1:]
    )
    print_section("agreement with the training form", check_agreement(variants, x))
    print_section("repfx graph vs the hand-folded ideal", structure_lines(variants))

    time_and_report(variants, x, args, target_lines)
    return 0


def time_and_report(
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    args: argparse.Namespace,
    targets: Callable[[dict[str, tuple[Summary, float]]], list[str]] | None = None,
    ratio_labels: Sequence[tuple[str, str, str]] = RATIOS,
) -> None:
    """Time ``variants`` interleaved and print latencies, paired ratios, ``targets`` (checked
    on the ratios) and, with ``--markdown``, the tables."""
    print(f"\n== timing: {args.warmup} warm-up + {args.rounds} interleaved rounds", flush=True)
    samples = measure_interleaved(
        variants,
        x,
        args.warmup,
        args.rounds,
        progress=lambda r: print(f"  round {r + 1}/{args.rounds}", flush=True),
    )
    ratios = ratio_summaries(samples, ratio_labels)
    print_section("latency per forward", latency_text(samples))
    print_section("ratios (lower = numerator faster)", ratio_text(ratios))
    if targets is not None:
        print_section("targets (from the paired medians)", targets(ratios))
    if args.markdown:
        print_section(
            "markdown",
            [*latency_markdown(samples, args.batch), "", *ratio_markdown(ratios)],
        )


if __name__ == "__main__":
    sys.exit(main())
