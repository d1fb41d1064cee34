"""Where one call of a compiled model goes: its graph, and everything around it.

``torch.compile(model, backend="repfx")`` and ``torch.compile(repfx.fold(model))`` compile the
same folded graph with inductor (``bench_compile.py`` times them whole). Around the graph, each
call also evaluates dynamo's guards — on the module tree it compiled (each submodule's
``training`` flag and hook dicts, each parameter) — and gathers the graph's inputs (every
parameter is one unless inductor's ``freezing`` is set); the backend then checks that the
tensors it froze are unchanged (``repfx.dynamo``). The backend compiles the *original* module
tree, which a fold shrinks: RepVGG-A0 has 373 modules and 168 parameters, its fold 77 and 46.

This script times both variants interleaved, the whole call and, inside it, the compiled
graph alone (inductor's compiled function, wrapped with a timer), so that the rest — dynamo's
frame, plus the backend's check — is measured under the same load as the graph. Both variants
compile with inductor's ``freezing`` on, as ``bench_compile.py`` compiles them: the fold then
compile variant with ``freezing`` set when dynamo traces it (dynamo then hands its parameters
over as attributes, which inductor can freeze), the backend without (it freezes the parameters
itself); ``--global-freezing`` sets it when dynamo traces the backend's variant too.

    python benchmarks/bench_dynamo_frame.py --models timm:repvgg_a0 repfx:riformer_s12
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compile import load
from bench_riformer import machine_lines

import repfx


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["timm:repvgg_a0", "repfx:riformer_s12"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=60, help="interleaved calls of each variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--global-freezing", action="store_true")
    return p.parse_args(argv)


class TimedInductor:
    """A dynamo backend: inductor with freezing, its compiled function timed on every call."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[object]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        with torch._inductor.config.patch(freezing=True):
            compiled = compile_fx(gm, list(example_inputs))

        def timed(*args: object) -> object:
            start = time.perf_counter()
            try:
                return compiled(*args)
            finally:
                self.seconds.append(time.perf_counter() - start)

        return timed


def measure(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace) -> list[str]:
    torch._dynamo.reset()
    folded = repfx.fold(copy.deepcopy(model), (x,), verify=False)
    graphs = {"fold_then_compile": TimedInductor(), "repfx": TimedInductor()}
    compiled = {
        "fold_then_compile": torch.compile(folded, backend=graphs["fold_then_compile"]),
        "repfx": torch.compile(
            copy.deepcopy(model), backend=repfx.compile_backend(graphs["repfx"])
        ),
    }
    with torch.inference_mode():
        for name, c in compiled.items():  # (compiled on the first call)
            froze = name == "fold_then_compile" or args.global_freezing
            with torch._inductor.config.patch(freezing=froze):
                for _ in range(3):
                    c(x)
            graphs[name].seconds.clear()
    whole: dict[str, list[float]] = {name: [] for name in compiled}
    with torch.inference_mode():
        for i in range(args.calls):
            for name in list(compiled) if i % 2 else list(compiled)[::-1]:
                start = time.perf_counter()
                compiled[name](x)
                whole[name].append(time.perf_counter() - start)
    rows = []
    for name in compiled:
        inside = graphs[name].seconds
        if len(inside) != len(whole[name]):
            raise SystemExit(f"{name}: {len(inside)} graph calls in {len(whole[name])} calls")
        rest = [w - g for w, g in zip(whole[name], inside, strict=True)]
        rows.append((name, whole[name], inside, rest))
    (_, fold_whole, fold_graph, _), (_, back_whole, back_graph, _) = rows
    paired_whole = statistics.median(a / b for a, b in zip(back_whole, fold_whole, strict=True))
    paired_graph = statistics.median(a / b for a, b in zip(back_graph, fold_graph, strict=True))
    return [
        f"| {name} | {statistics.median(w) * 1e3:.2f} | {statistics.median(g) * 1e3:.2f} "
        f"| {statistics.median(r) * 1e6:.0f} |"
        for name, w, g, r in rows
    ] + [f"| repfx / fold_then_compile, paired | {paired_whole:.3f} | {paired_graph:.3f} | |"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("\n".join(machine_lines(sys.argv)))
    print(
        f"{args.calls} interleaved calls each, batch {args.batch}, {args.size}×{args.size}, "
        f"backend traced with freezing {'set' if args.global_freezing else 'not set'}"
    )
    for spec in args.models:
        model = load(spec)
        x = torch.randn(args.batch, 3, args.size, args.size)
        print(f"\n{spec}\n\n| variant | whole call ms | graph ms | the rest µs |")
        print("|---|---:|---:|---:|")
        print("\n".join(measure(model, x, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
