"""Interleaved CPU latency of ``torch.compile`` variants: eager, inductor (default), inductor
with ``freezing=True``, and ``backend=repfx.compile_backend("inductor")``.

Models: RepVGG-A0 (``repfx.models``: summed conv / BN / identity branches) and RIFormer-S12,
each from one set of random weights with every BN statistic and affine re-drawn at O(1) (the
script checks that all variants agree before timing). Every variant is its own deep copy, so
dynamo compiles each with its own backend; compilation happens during the warm-up. Rounds are
interleaved with a rotating start, ratios are per round ("paired"), as in bench_riformer.py.

Target (issue): repfx ≤ 0.85× inductor-with-freezing on the RepVGG-style net, and no slower
on RIFormer-S12.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_riformer import Summary, machine_lines, measure_interleaved
from grammar import randomise_

import repfx
from repfx.models import create
from repfx.tolerances import assert_close

VARIANTS = ("eager", "inductor", "inductor_freezing", "repfx")
TARGETS = {"repvgg_a0": 0.85, "riformer_s12": 1.0}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(TARGETS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    return p.parse_args(argv)


def build_variants(model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    """Each variant on its own copy; compiled ones are compiled here (first call)."""
    variants = {
        "eager": copy.deepcopy(model),
        "inductor": torch.compile(copy.deepcopy(model)),
        "inductor_freezing": torch.compile(copy.deepcopy(model)),
        "repfx": torch.compile(copy.deepcopy(model), backend=repfx.compile_backend("inductor")),
    }
    with torch.inference_mode():
        for name, module in variants.items():
            if name == "inductor_freezing":
                with torch._inductor.config.patch(freezing=True):
                    module(x)
            else:
                module(x)
    return variants


def run_model(name: str, args: argparse.Namespace) -> list[str]:
    model = randomise_(create(name), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(f"== {name}: compiling {len(VARIANTS) - 1} variants ...", file=sys.stderr, flush=True)
    variants = build_variants(model, x)
    with torch.inference_mode():
        expected = variants["eager"](x)
        for variant in VARIANTS[1:]:
            assert_close(variants[variant](x), expected)
    samples = measure_interleaved(variants, x, args.warmup, args.rounds)
    medians = {v: statistics.median(samples[v]) * 1e3 for v in VARIANTS}
    ratio = Summary.of(
        [a / b for a, b in zip(samples["repfx"], samples["inductor_freezing"], strict=True)]
    )
    vs_default = Summary.of(
        [a / b for a, b in zip(samples["repfx"], samples["inductor"], strict=True)]
    )
    target = TARGETS.get(name)
    verdict = "" if target is None else ("met" if ratio.median <= target else "NOT met")
    cells = " | ".join(f"{medians[v]:.1f}" for v in VARIANTS)
    return [
        f"| {name} | {cells} | {vs_default.median:.3f} | {ratio.median:.3f} "
        f"({ratio.q1:.3f}–{ratio.q3:.3f}) | ≤ {target} {verdict} |"
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("\n".join(machine_lines(sys.argv)))
    print(f"input {args.batch}x3x{args.size}x{args.size}, {args.rounds} interleaved rounds\n")
    header = " | ".join(f"{v} ms" for v in VARIANTS)
    rows = [
        f"| model | {header} | repfx / inductor | repfx / inductor freezing (q1–q3) | target |",
        "|---|" + "---:|" * (len(VARIANTS) + 2) + "---|",
    ]
    for name in args.models:
        rows += run_model(name, args)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
