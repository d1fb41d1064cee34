"""repfx vs timm's own reparameterization on timm's reparameterizable models; fold-time scaling.

Part 1 — eager CPU inference latency, measured interleaved, of three forms of each model in
``--models`` (default: repvgg_a0, repvgg_b1g4, mobileone_s0, fastvit_t8, repvit_m1,
repghostnet_050), all built from ONE set of random weights:

- ``original``  the training-form model, ``timm.create_model(name)`` in eval mode;
- ``repfx``     ``repfx.fold(original, (x,))`` with verification on;
- ``timm``      ``timm.utils.reparameterize_model(copy.deepcopy(original))``: the models'
                hand-written ``reparameterize()`` / ``fuse()`` methods.

Method (as ``bench_riformer.py``):

1. Build the model, then re-draw every BatchNorm's statistics and affine, conv / linear biases
   and every LayerScale ``gamma`` at O(1) (identity BN statistics and 1e-5 LayerScales would
   make a wrong fold invisible). Check that both folded forms agree with the original
   (``repfx.testing.assert_close``), and count the convolutions and BatchNorms each form
   actually runs (ATen kernels dispatched in one forward).
2. Under ``torch.inference_mode()``, a few warm-up forwards of each form, then ``--rounds``
   rounds; each round times one forward of every form (``time.perf_counter``), round-robin,
   rotating the starting form each round.
3. Report per form the median latency and its IQR, and per ratio (repfx / timm, repfx /
   original, timm / original) the median and IQR of the per-round *paired* ratios next to the
   ratio of the medians. Target: repfx <= 1.02x timm on every model (paired median).

Part 2 — fold-time scaling: ``repfx.fold`` wall time on a chain of N RepVGG blocks (3x3
conv+BN + 1x1 conv+BN + BN identity, summed, ReLU; ``--chain-channels`` channels, 8x8
example input) at ``--depths`` (default 100 200 400 800), with the time ratio per doubling
(linear in N → about 2x). ``--chain-block plain`` builds the blocks from ``nn.Conv2d`` /
``nn.BatchNorm2d``; ``--chain-block timm`` uses timm's ``RepVggBlock`` (whose
``BatchNormAct2d`` asserts its input rank).

Run ``python benchmarks/bench_timm_reparam.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch

# Shared with the RIFormer benchmark in this directory (the script's own directory is on
# sys.path when it runs as ``python benchmarks/bench_timm_reparam.py``).
from bench_riformer import Summary, machine_lines, measure_interleaved, print_section
from timm.models.byobnet import RepVggBlock
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

import repfx
from repfx.ir.op_kinds import op_counts
from repfx.proof.tolerances import max_errors
from repfx.testing import assert_close

MODELS: tuple[str, ...] = (
    "repvgg_a0",
    "repvgg_b1g4",
    "mobileone_s0",
    "fastvit_t8",
    "repvit_m1",
    "repghostnet_050",
)
VARIANTS: tuple[str, ...] = ("original", "repfx", "timm")

# (label, numerator, denominator)
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("repfx / timm", "repfx", "timm"),
    ("repfx / original", "repfx", "original"),
    ("timm / original", "timm", "original"),
)
TARGET_LABEL, TARGET_LIMIT = "repfx / timm", 1.02  # on every model, from the paired median


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Interleaved eager CPU latency of timm models: original / repfx-folded / "
        "timm-reparameterized; and repfx fold time on deep RepVGG chains."
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help="timm model names (default: the six)"
    )
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--size", type=int, default=224, help="input height = width (224)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per model (10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up forwards per variant (2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and input")
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=[100, 200, 400, 800],
        help="RepVGG chain depths for the fold-time scaling (default 100 200 400 800)",
    )
    parser.add_argument(
        "--chain-channels", type=int, default=16, help="channels of the chain blocks (16)"
    )
    parser.add_argument(
        "--chain-block",
        choices=("plain", "timm", "both"),
        default="plain",
        help="chain blocks: plain nn.Conv2d/BatchNorm2d, timm's RepVggBlock, or both (plain)",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip part 1 (model latency)")
    parser.add_argument("--no-scaling", action="store_true", help="skip part 2 (fold-time scaling)")
    parser.add_argument(
        "--markdown", action="store_true", help="also print markdown tables for RESULTS.md"
    )
    args = parser.parse_args(argv)
    if min(args.batch, args.size, args.rounds, args.chain_channels, *args.depths) < 1:
        parser.error("--batch, --size, --rounds, --chain-channels and --depths must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# --------------------------------------------------------------------------- models


def redraw_(model: nn.Module, seed: int) -> nn.Module:
    """In place, at O(1): BN statistics and affine, conv / linear biases, LayerScale gammas
    (any parameter named ``gamma``, e.g. timm's and fastvit's ``LayerScale2d``)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor | None, mean: float, std: float) -> None:
        if t is not None:
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            t.copy_((mean + std * noise).to(t.dtype))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                draw(m.running_mean, 0.0, 0.3)
                var = torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64)
                m.running_var.copy_(0.5 + var)
                draw(m.weight, 1.0, 0.5)
                draw(m.bias, 0.0, 0.3)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                draw(m.bias, 0.0, 0.2)
            draw(m._parameters.get("gamma"), 1.0, 0.5)
    return model


def build_original(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    return redraw_(model, seed + 1).eval()


# ATen names a conv reaches a dispatch mode under (``convolution`` under no_grad; the
# ``conv*d`` entry points themselves under inference_mode). One forward call is counted once.
CONV_KERNELS = ("convolution", "_convolution", "conv1d", "conv2d", "conv3d")


class KernelCounter(TorchDispatchMode):
    """Counts ATen kernels by name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def kernels_run(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(convolutions, BatchNorms) one forward of ``model`` actually runs."""
    with torch.no_grad(), KernelCounter() as counter:
        model(x)
    c = counter.counts
    return sum(c[k] for k in CONV_KERNELS), sum(v for k, v in c.items() if "batch_norm" in k)


@dataclass
class ModelSetup:
    name: str
    variants: dict[str, nn.Module]
    fold_seconds: float
    timm_seconds: float
    kernels: dict[str, tuple[int, int]]  # variant -> (convs, BatchNorms) run per forward
    errors: dict[str, float]  # variant -> max relative error vs the original
    skipped: int  # candidates repfx reported as not folded


def setup_model(name: str, x: torch.Tensor, seed: int) -> ModelSetup:
    original = build_original(name, seed)
    start = time.perf_counter()
    folded = repfx.fold(original, (x,), verify=True).eval()
    fold_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reparam = timm.utils.reparameterize_model(copy.deepcopy(original)).eval()
    timm_seconds = time.perf_counter() - start
    variants = {"original": original, "repfx": folded, "timm": reparam}
    errors = {}
    with torch.inference_mode():
        expected = original(x)
        for variant in ("repfx", "timm"):
            actual = variants[variant](x)
            assert torch.isfinite(actual).all(), f"{name} {variant}: non-finite output"
            assert_close(actual, expected)
            errors[variant] = max_errors(actual, expected)[1]
    kernels = {v: kernels_run(m, x) for v, m in variants.items()}
    skipped = len(folded.meta[repfx.REPORT_KEY].skipped)
    return ModelSetup(name, variants, fold_seconds, timm_seconds, kernels, errors, skipped)


# --------------------------------------------------------------------------- timing


def ratio_summaries(samples: dict[str, list[float]]) -> dict[str, tuple[Summary, float]]:
    """For each ratio: (summary of the per-round paired ratios, ratio of the medians)."""
    medians = {name: statistics.median(values) for name, values in samples.items()}
    out = {}
    for label, num, den in RATIOS:
        paired = [a / b for a, b in zip(samples[num], samples[den], strict=True)]
        out[label] = (Summary.of(paired), medians[num] / medians[den])
    return out


@dataclass
class ModelResult:
    setup: ModelSetup
    samples: dict[str, list[float]]
    ratios: dict[str, tuple[Summary, float]]

    @property
    def target_met(self) -> bool:
        return self.ratios[TARGET_LABEL][0].median <= TARGET_LIMIT


# --------------------------------------------------------------------------- fold scaling


class PlainRepVggBlock(nn.Module):
    """``relu(bn3(conv3x3(x)) + bn1(conv1x1(x)) + bn_id(x))`` from plain torch modules."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn_id = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


def build_chain(block: str, depth: int, channels: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    if block == "plain":
        blocks = [PlainRepVggBlock(channels) for _ in range(depth)]
    else:
        blocks = [RepVggBlock(channels, channels) for _ in range(depth)]
    chain = nn.Sequential(*blocks)
    # Small BN scales keep 800 summed blocks finite; the fold's work does not depend on them.
    redraw_(chain, seed + 1)
    with torch.no_grad():
        for m in chain.modules():
            if isinstance(m, _BatchNorm):
                m.weight.mul_(0.3)
    return chain.eval()


@dataclass
class ScalingRow:
    block: str
    depth: int
    nodes_before: int
    fold_seconds: float
    trace_seconds: float | None  # of which torch.fx tracing (repfx's capture step)
    convs_after: int  # conv ops in the folded graph (ideal: one per block)


class CaptureTimer:
    """Times the capture (torch.fx tracing) step inside ``repfx.fold``, by wrapping the
    ``capture`` function that ``repfx.fold``'s module calls (a benchmark-only probe; if
    repfx's internals move, the split is reported as unavailable instead)."""

    def __init__(self) -> None:
        self.module = sys.modules.get("repfx.fold")
        self.available = callable(getattr(self.module, "capture", None))
        self.seconds = 0.0

    def __enter__(self) -> CaptureTimer:
        if self.available:
            self.original = self.module.capture

            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return self.original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            self.module.capture = timed
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self.module.capture = self.original


def measure_fold_scaling(
    block: str, depths: Sequence[int], channels: int, seed: int
) -> list[ScalingRow]:
    rows = []
    for depth in depths:
        chain = build_chain(block, depth, channels, seed)
        x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
        gc.collect()
        with CaptureTimer() as timer:
            start = time.perf_counter()
            folded = repfx.fold(chain, (x,))
            seconds = time.perf_counter() - start
        trace = timer.seconds if timer.available else None
        report = folded.meta[repfx.REPORT_KEY]
        convs = op_counts(folded)["conv"]
        rows.append(ScalingRow(block, depth, report.before.nodes, seconds, trace, convs))
        print(f"  {block} depth {depth}: {seconds:.2f} s", flush=True)
        del chain, folded
    return rows


# --------------------------------------------------------------------------- reporting


def model_lines(result: ModelResult) -> list[str]:
    s = result.setup
    lines = [
        f"fold time: repfx {s.fold_seconds:.2f} s (with verification), timm "
        f"{s.timm_seconds:.2f} s; repfx candidates not folded: {s.skipped}",
        "kernels run per forward (convs / BatchNorms): "
        + ", ".join(f"{v} {c} / {b}" for v, (c, b) in s.kernels.items()),
        "max rel error vs original: " + ", ".join(f"{v} {e:.3g}" for v, e in s.errors.items()),
        f"{'variant':>9}  {'median ms':>10}  {'IQR ms':>8}  {'q1 ms':>8}  {'q3 ms':>8}",
    ]
    for name, values in result.samples.items():
        q = Summary.of(values)
        lines.append(
            f"{name:>9}  {q.median * 1e3:10.2f}  {q.iqr * 1e3:8.2f}  "
            f"{q.q1 * 1e3:8.2f}  {q.q3 * 1e3:8.2f}"
        )
    lines.append(f"{'ratio':>17}  {'paired median':>13}  {'paired IQR':>10}  {'of medians':>10}")
    for label, (paired, of_medians) in result.ratios.items():
        lines.append(f"{label:>17}  {paired.median:13.3f}  {paired.iqr:10.3f}  {of_medians:10.3f}")
    return lines


def target_lines(results: Sequence[ModelResult]) -> list[str]:
    lines = []
    for r in results:
        paired = r.ratios[TARGET_LABEL][0]
        verdict = "MET" if r.target_met else "NOT MET"
        lines.append(
            f"{r.setup.name:>16}: {TARGET_LABEL} = {paired.median:.3f} "
            f"(target <= {TARGET_LIMIT:.2f}) -> {verdict}"
        )
    met = sum(r.target_met for r in results)
    lines.append(f"met on {met} of {len(results)} models")
    return lines


def scaling_lines(rows: Sequence[ScalingRow]) -> list[str]:
    lines = [
        f"{'block':>6}  {'depth':>6}  {'nodes':>7}  {'fold s':>8}  {'trace s':>8}  "
        f"{'ms/block':>9}  {'x prev':>7}  {'convs after':>11}"
    ]
    previous: dict[str, ScalingRow] = {}
    for row in rows:
        prev = previous.get(row.block)
        step = f"{row.fold_seconds / prev.fold_seconds:7.2f}" if prev else f"{'-':>7}"
        trace = f"{row.trace_seconds:8.2f}" if row.trace_seconds is not None else f"{'?':>8}"
        lines.append(
            f"{row.block:>6}  {row.depth:>6}  {row.nodes_before:>7}  {row.fold_seconds:8.2f}  "
            f"{trace}  {row.fold_seconds / row.depth * 1e3:9.1f}  {step}  {row.convs_after:>11}"
        )
        previous[row.block] = row
    return lines


def markdown_lines(results: Sequence[ModelResult], rows: Sequence[ScalingRow]) -> list[str]:
    lines: list[str] = []
    if results:
        lines += [
            "| model | original ms (IQR) | repfx ms (IQR) | timm ms (IQR) | repfx / timm "
            "paired (q1–q3) | repfx / original paired | timm / original paired | target |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in results:
            cells = []
            for v in VARIANTS:
                q = Summary.of(r.samples[v])
                cells.append(f"{q.median * 1e3:.1f} ({q.iqr * 1e3:.1f})")
            rt, ro, to = (r.ratios[label][0] for label, _, _ in RATIOS)
            lines.append(
                f"| {r.setup.name} | {' | '.join(cells)} | {rt.median:.3f} "
                f"({rt.q1:.3f}–{rt.q3:.3f}) | {ro.median:.3f} | {to.median:.3f} | "
                f"{'met' if r.target_met else 'NOT met'} |"
            )
        lines += [
            "",
            "| model | convs run: original / repfx / timm | BatchNorms run: original / repfx "
            "/ timm | max rel error vs original: repfx / timm | fold s: repfx / timm |",
            "|---|---|---|---|---|",
        ]
        for r in results:
            s = r.setup
            k = s.kernels
            lines.append(
                f"| {s.name} | {' / '.join(str(k[v][0]) for v in VARIANTS)} | "
                f"{' / '.join(str(k[v][1]) for v in VARIANTS)} | "
                f"{s.errors['repfx']:.2g} / {s.errors['timm']:.2g} | "
                f"{s.fold_seconds:.2f} / {s.timm_seconds:.2f} |"
            )
    if rows:
        if lines:
            lines.append("")
        lines += [
            "| block | depth | graph nodes | fold (s) | of which fx trace (s) | ms / block "
            "| fold × previous depth | convs after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        previous: dict[str, ScalingRow] = {}
        for row in rows:
            prev = previous.get(row.block)
            step = f"{row.fold_seconds / prev.fold_seconds:.2f}" if prev else "–"
            trace = f"{row.trace_seconds:.2f}" if row.trace_seconds is not None else "?"
            lines.append(
                f"| {row.block} | {row.depth} | {row.nodes_before} | {row.fold_seconds:.2f} | "
                f"{trace} | {row.fold_seconds / row.depth * 1e3:.1f} | {step} | "
                f"{row.convs_after} |"
            )
            previous[row.block] = row
    return lines


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shown_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    print_section("machine", [*machine_lines(shown_argv), f"timm     : {timm.__version__}"])
    started = time.perf_counter()

    results: list[ModelResult] = []
    if not args.no_latency:
        x = torch.randn(
            args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)
        )
        print_section(
            "config",
            [
                f"input {args.batch}x3x{args.size}x{args.size}, float32, seed {args.seed}, "
                f"{args.warmup} warm-up + {args.rounds} interleaved rounds per model"
            ],
        )
        for name in args.models:
            print(f"\n== {name}: building, folding, checking", flush=True)
            setup = setup_model(name, x, args.seed)
            samples = measure_interleaved(setup.variants, x, args.warmup, args.rounds)
            result = ModelResult(setup, samples, ratio_summaries(samples))
            results.append(result)
            print_section(
                f"{name} (batch {args.batch}, {args.size}x{args.size})", model_lines(result)
            )
            setup.variants = {}  # free the models before the next one
            gc.collect()
        print_section(
            f"target: {TARGET_LABEL} <= {TARGET_LIMIT} on every model", target_lines(results)
        )

    rows: list[ScalingRow] = []
    if not args.no_scaling:
        blocks = ("plain", "timm") if args.chain_block == "both" else (args.chain_block,)
        print(
            f"\n== fold-time scaling: RepVGG chains, {args.chain_channels} channels, "
            f"example input 1x{args.chain_channels}x8x8, repfx.fold with verification",
            flush=True,
        )
        for block in blocks:
            rows += measure_fold_scaling(block, args.depths, args.chain_channels, args.seed)
        print_section(
            "fold time per depth (x prev: ratio to the previous depth)", scaling_lines(rows)
        )

    if args.markdown:
        print_section("markdown", markdown_lines(results, rows))
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
