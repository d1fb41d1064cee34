"""What the run-time checks of a fold cost: interleaved CPU latency with and without them.

Two checks run on every call of a folded model:

* the rank guards of ``repfx.fold`` (``repfx.ir.graph.require_rank``: one ``dim()`` compare per
  guarded input) — the folded module against the same module with its guard nodes removed;
* the frozen-tensor check of ``backend="repfx"`` (``repfx.dynamo.WatchedGraph``: identity and
  version counter of each frozen tensor, values of BN running statistics) — the watched graph
  against the compiled graph it guards, called directly with the same arguments (inner backend
  ``eager``, so that the forward itself is the same code in both).

Each pair is timed with an A/A pair (the same module twice) in the same interleaved rounds: the
spread of the A/A ratio is the measurement noise the check's ratio is read against.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import fx, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_riformer import Summary, machine_lines, measure_interleaved, paired_ratios

import repfx
from repfx.dynamo import WatchedGraph, compile_backend
from repfx.ir.graph import require_rank
from repfx.models import create
from repfx.proof.redraw import redraw_foldable_parameters_

MODELS = ("timm:resnet50", "repfx:riformer_s12", "timm:resnet18")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def build(spec: str) -> nn.Module:
    source, name = spec.split(":", 1)
    if source == "timm":
        import timm

        model = timm.create_model(name, num_classes=10)
    else:
        model = create(name, num_classes=10)
    return redraw_foldable_parameters_(model.eval())


def without_guards(folded: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``folded`` with its rank guards erased (they compute nothing)."""
    copied = copy.deepcopy(folded)
    for node in list(copied.graph.nodes):
        if node.op == "call_function" and node.target is require_rank:
            copied.graph.erase_node(node)
    copied.recompile()
    return copied


def watched_graph(model: nn.Module, x: torch.Tensor) -> tuple[WatchedGraph, list[torch.Tensor]]:
    """The graph ``backend=compile_backend("eager")`` returns for ``model``, and the arguments
    dynamo calls it with."""
    backend, found, calls = compile_backend(inner="eager"), [], []

    def grab(gm: fx.GraphModule, example_inputs: list) -> Callable:
        graph = backend(gm, example_inputs)
        found.append(graph)
        return lambda *args: calls.append(list(args)) or graph(*args)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab)(x)
    (graph,) = found
    if not isinstance(graph, WatchedGraph):
        raise SystemExit(f"nothing frozen in {type(model).__name__}'s graph")
    return graph, calls[-1]


class Call(nn.Module):
    """``fn(*args)`` as a module of the input the benchmark passes (which it ignores)."""

    def __init__(self, fn: Callable, args: list) -> None:
        super().__init__()
        self.fn, self.args = fn, args

    def forward(self, _: torch.Tensor) -> object:
        return self.fn(*self.args)


def seconds_per_call(fn: Callable[[], object], calls: int = 2000) -> float:
    """The median over 5 repeats of ``fn``'s time per call, over ``calls`` calls."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def ratio_line(samples: dict[str, list[float]], num: str, den: str) -> str:
    ratios = Summary.of(paired_ratios(samples, num, den))
    return f"{num} / {den}: {ratios.median:.4f} (IQR {ratios.q1:.4f}–{ratios.q3:.4f})"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for line in machine_lines(sys.argv if argv is None else ["bench_guards.py", *argv]):
        print(line)
    x = torch.randn(args.batch, 3, args.size, args.size)
    for spec in args.models:
        model = build(spec)
        folded = repfx.fold(model, (x,))
        guards = sum(n.target is require_rank for n in folded.graph.nodes)
        graph, call_args = watched_graph(model, x)
        kept = [call_args[i] for i in graph._keep]
        variants = {
            "guarded": folded,
            "guarded_again": folded,
            "unguarded": without_guards(folded),
            "watched": Call(graph, call_args),
            "watched_again": Call(graph, call_args),
            "unwatched": Call(graph._compiled, kept),
        }
        with torch.no_grad():
            check = seconds_per_call(partial(graph._changed, call_args))
            guard = seconds_per_call(lambda: require_rank(x, 4, "x", "Conv2d conv"))
        samples = measure_interleaved(variants, x, args.warmup, args.rounds)
        medians = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        print(f"\n{spec}, batch {args.batch}, {args.size}², {args.rounds} rounds")
        print(
            f"  rank guards: {guards}; frozen tensors watched: {len(graph._versions)} by "
            f"version, {len(graph._values)} by value"
        )
        forward = medians["unwatched"] * 1e-3
        print(
            f"  alone: the frozen-tensor check {check * 1e6:.1f} µs a call "
            f"({check / forward:.2%} of the forward), one rank guard {guard * 1e6:.2f} µs "
            f"({guards * guard / forward:.4%})"
        )
        print("  median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
        for num, den in (
            ("guarded", "unguarded"),
            ("guarded_again", "guarded"),
            ("watched", "unwatched"),
            ("watched_again", "watched"),
        ):
            print("  " + ratio_line(samples, num, den))


if __name__ == "__main__":
    main()
