"""Interleaved CPU latency of ``torch.compile`` variants: eager, inductor (default), inductor
with ``freezing=True``, ``torch.compile(repfx.fold(model))`` (with freezing) and
``backend=repfx.compile_backend("inductor")``.

Models (``--models``; ``timm:NAME`` or ``repfx:NAME``): RepVGG-A0, MobileOne-S0, FastViT-T8 and
ResNet-50 from timm, RIFormer-S12 from ``repfx.models``; each from one set of random weights
with every foldable parameter re-drawn at O(1) (``repfx.proof.redraw``: BN statistics, affines,
LayerScales), and checked: every variant must agree with eager before it is timed. Every variant
is its own deep copy, so dynamo compiles each with its own backend; compilation happens during
the warm-up. Rounds are interleaved with a rotating start; ratios are per round ("paired").

``net:repvgg_8x64`` (8 blocks of 3×3 conv + BN, 1×1 conv + BN and an identity BN, 64 channels,
on 64 × 56 × 56 inputs whatever ``--sizes`` says) is the small RepVGG-style net of the
backend's first target.

Targets: the repfx backend within 3% of ``torch.compile(repfx.fold(model))``; at most 0.85×
inductor with freezing on the RepVGG family (RepVGG, MobileOne), at most 1.0× on the others.
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

from bench_riformer import Summary, machine_lines, measure_interleaved

import repfx
from repfx.models import create
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.testing import assert_close

VARIANTS = ("eager", "inductor", "inductor_freezing", "fold_then_compile", "repfx")
MODELS = (
    "timm:repvgg_a0",
    "timm:mobileone_s0",
    "timm:fastvit_t8",
    "repfx:riformer_s12",
    "timm:resnet50",
)
REPVGG_FAMILY = ("repvgg", "mobileone")  # also net:repvgg_8x64: 8 RepVGG-style blocks, 64 ch
TARGET_REPVGG, TARGET_OTHERS, TARGET_VS_FOLD = 0.85, 1.0, 1.03


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 160])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


class RepVggStyleBlock(nn.Module):
    """3×3 conv + BN, 1×1 conv + BN and an identity BN, summed, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn_identity = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_identity(x))


# name -> (model, input shape (C, H, W) overriding 3 × size × size, batch)
BUILT_IN = {
    "net:repvgg_8x64": (lambda: nn.Sequential(*[RepVggStyleBlock(64) for _ in range(8)]), 64, 56),
}


def load(spec: str) -> nn.Module:
    source, _, name = spec.partition(":")
    if spec in BUILT_IN:
        model = BUILT_IN[spec][0]()
    elif source == "timm":
        import timm

        model = timm.create_model(name)
    elif source == "repfx":
        model = create(name)
    else:
        raise SystemExit(f"model {spec!r}: expected timm:NAME or repfx:NAME")
    return redraw_foldable_parameters_(model, seed=0).eval()


def _compile_frozen(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    compiled = torch.compile(model, **kwargs)
    with torch._inductor.config.patch(freezing=True), torch.inference_mode():
        compiled(x)
    return compiled


def build_variants(model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    """Each variant on its own copy; compiled ones are compiled here (first call)."""
    folded = repfx.fold(copy.deepcopy(model), (x,), verify=False)  # checked against eager below
    variants = {
        "eager": copy.deepcopy(model),
        "inductor": torch.compile(copy.deepcopy(model)),
        "inductor_freezing": _compile_frozen(copy.deepcopy(model), x),
        "fold_then_compile": _compile_frozen(folded, x),
        "repfx": torch.compile(copy.deepcopy(model), backend=repfx.compile_backend("inductor")),
    }
    with torch.inference_mode():
        variants["inductor"](x)
        variants["repfx"](x)
    return variants


def target_for(spec: str) -> float:
    return TARGET_REPVGG if any(f in spec for f in REPVGG_FAMILY) else TARGET_OTHERS


def run_model(spec: str, size: int, args: argparse.Namespace) -> str:
    # Each model's variants compile the same forward: without a reset, dynamo's per-code cache
    # limit (8) is reached after two sizes and later variants silently run eagerly.
    torch._dynamo.reset()
    model = load(spec)
    gen = torch.Generator().manual_seed(1)
    channels, size = BUILT_IN[spec][1:] if spec in BUILT_IN else (3, size)
    x = torch.randn(args.batch, channels, size, size, generator=gen)
    print(f"== {spec} at {size}: compiling ...", file=sys.stderr, flush=True)
    variants = build_variants(model, x)
    with torch.inference_mode():
        expected = variants["eager"](x)
        for variant in VARIANTS[1:]:
            assert_close(variants[variant](x), expected)
    samples = measure_interleaved(variants, x, args.warmup, args.rounds)
    medians = {v: statistics.median(samples[v]) * 1e3 for v in VARIANTS}

    def paired(den: str) -> Summary:
        pairs = zip(samples["repfx"], samples[den], strict=True)
        return Summary.of([a / b for a, b in pairs])

    vs_freezing, vs_fold = paired("inductor_freezing"), paired("fold_then_compile")
    target = target_for(spec)
    met = vs_freezing.median <= target and vs_fold.median <= TARGET_VS_FOLD
    cells = " | ".join(f"{medians[v]:.1f}" for v in VARIANTS)
    return (
        f"| {spec} | {size} | {cells} | {vs_freezing.median:.3f} ({vs_freezing.q1:.3f}–"
        f"{vs_freezing.q3:.3f}) | {vs_fold.median:.3f} ({vs_fold.q1:.3f}–{vs_fold.q3:.3f}) "
        f"| ≤ {target} and ≤ {TARGET_VS_FOLD}: {'met' if met else 'NOT met'} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("\n".join(machine_lines(sys.argv)))
    print(f"batch {args.batch}, sizes {args.sizes}, {args.rounds} interleaved rounds\n")
    header = " | ".join(f"{v} ms" for v in VARIANTS)
    print(
        f"| model | size | {header} | repfx / inductor freezing (q1–q3) "
        "| repfx / fold then compile (q1–q3) | targets |"
    )
    print("|---|---:|" + "---:|" * (len(VARIANTS) + 2) + "---|", flush=True)
    for size in args.sizes:
        for spec in args.models:
            print(run_model(spec, size, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
