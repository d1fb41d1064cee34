"""Eager CPU inference latency of PoolFormer, unfolded and repfx-folded, measured interleaved.

Variants, both from ONE set of random weights (so they compute the same function):

- ``unfolded``  ``repfx.models.metaformer.poolformer_s12()`` (or ``--model``) in eval mode:
                ``x + ls1 * (avgpool(N1(x)) - N1(x))`` then ``x + ls2 * mlp(N2(x))``;
- ``repfx``     ``repfx.fold(unfolded, (x,))`` with verification on.

Method:

1. Build the model, then re-draw every LayerScale and norm affine (and conv bias) at O(1) with
   ``repfx.proof.redraw.redraw_foldable_parameters_`` (the published LayerScale init of 1e-5 would
   make a wrong fold invisible). Fold it and assert with ``repfx.testing.assert_close`` that
   the folded form agrees with the unfolded one on the benchmark input.
2. Count, per variant, the ATen kernels one forward dispatches (a ``TorchDispatchMode`` under
   ``torch.inference_mode()``, as timed): multiplies, group norms, average pools and
   convolutions, and the multiplies that read a stored parameter / buffer of more than one
   element (a LayerScale left in the graph).
3. Under ``torch.inference_mode()``, a few warm-up forwards of each variant, then ``--rounds``
   rounds; each round times one forward of every variant with ``time.perf_counter``,
   round-robin, rotating the starting variant each round (as ``bench_riformer.py``).
4. Report per variant the median latency and its inter-quartile range (IQR), and for
   repfx / unfolded the median and IQR of the per-round *paired* ratios next to the ratio of
   the medians.

Run ``python benchmarks/bench_poolformer.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

import torch

# Shared with the RIFormer benchmark in this directory (the script's own directory is on
# sys.path when it runs as ``python benchmarks/bench_poolformer.py``).
from bench_riformer import machine_lines, parse_latency_args, print_section, time_and_report
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import repfx
import repfx.models
from repfx.proof.redraw import redraw_foldable_parameters_
from repfx.proof.tolerances import max_errors
from repfx.testing import assert_close

# (label, numerator, denominator)
RATIOS: tuple[tuple[str, str, str], ...] = (("repfx / unfolded", "repfx", "unfolded"),)

# Reported kernel groups: (label, ATen overload packet names). A conv reaches a dispatch mode
# as ``conv2d`` under inference_mode and as ``convolution`` under no_grad; likewise group norm.
KERNEL_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mul", ("mul", "mul_")),
    ("group_norm", ("group_norm", "native_group_norm")),
    ("avg_pool2d", ("avg_pool2d",)),
    ("convolution", ("convolution", "_convolution", "conv1d", "conv2d", "conv3d")),
)
MUL_KERNELS = KERNEL_GROUPS[0][1]


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_latency_args(
        argv,
        "Interleaved eager CPU latency of PoolFormer: unfolded / repfx-folded.",
        family="poolformer",
    )


# --------------------------------------------------------------------------- models


def build_unfolded(model_name: str, seed: int) -> nn.Module:
    """The unfolded model in eval mode, its foldable parameters re-drawn at O(1)."""
    torch.manual_seed(seed)
    model = repfx.models.create(model_name)
    return redraw_foldable_parameters_(model, seed).eval()


def check_agreement(variants: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    """Assert the folded form matches the unfolded one on ``x``; return one line."""
    with torch.inference_mode():
        expected, actual = variants["unfolded"](x), variants["repfx"](x)
    assert_close(actual, expected)
    abs_err, rel_err = max_errors(actual, expected)
    return [f"repfx vs unfolded: max abs {abs_err:.3g}, max rel {rel_err:.3g}"]


# --------------------------------------------------------------------------- structure


def stored_tensors(module: nn.Module) -> dict[int, int]:
    """Storage address -> element count of every parameter, buffer and plain tensor
    attribute of ``module`` and its submodules (a folded graph's constants included)."""
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): t.numel() for t in tensors}


class KernelCounter(TorchDispatchMode):
    """Counts ATen kernels by name, and multiplies reading a stored tensor of > 1 element."""

    def __init__(self, stored: dict[int, int]) -> None:
        super().__init__()
        self.stored = stored
        self.counts: Counter[str] = Counter()
        self.stored_muls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if name in MUL_KERNELS and any(self._is_stored(a) for a in args):
            self.stored_muls += 1
        return func(*args, **(kwargs or {}))

    def _is_stored(self, arg: object) -> bool:
        if not isinstance(arg, torch.Tensor):
            return False
        return self.stored.get(arg.untyped_storage().data_ptr(), 0) > 1


def count_kernels(model: nn.Module, x: torch.Tensor) -> KernelCounter:
    with torch.inference_mode(), KernelCounter(stored_tensors(model)) as counter:
        model(x)
    return counter


def structure_lines(variants: dict[str, nn.Module], x: torch.Tensor) -> list[str]:
    """Per variant: the reported kernel groups, then every kernel dispatched."""
    lines = []
    for name, model in variants.items():
        counter = count_kernels(model, x)
        groups = ", ".join(
            f"{label} {sum(counter.counts[k] for k in kernels)}" for label, kernels in KERNEL_GROUPS
        )
        lines.append(
            f"{name:>8}: {groups}; mul by a stored tensor of > 1 element {counter.stored_muls}"
        )
        lines.append(f"{'':>8}  all: {dict(sorted(counter.counts.items()))}")
    return lines


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shown_argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    print_section("machine", machine_lines(shown_argv))

    unfolded = build_unfolded(args.model, args.seed)
    x = torch.randn(
        args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)
    )
    variants = {"unfolded": unfolded, "repfx": repfx.fold(unfolded, (x,)).eval()}
    config = (
        f"{args.model}, input {args.batch}x3x{args.size}x{args.size}, float32, seed {args.seed}"
    )
    print_section("config", [config])
    print_section(
        "repfx fold report", str(variants["repfx"].meta[repfx.REPORT_KEY]).splitlines()[1:]
    )
    print_section("agreement", check_agreement(variants, x))
    print_section("ATen kernels per forward", structure_lines(variants, x))

    time_and_report(variants, x, args, ratio_labels=RATIOS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
