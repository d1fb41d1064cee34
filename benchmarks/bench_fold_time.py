"""Fold time of this checkout against another checkout of repfx, measured side by side.

    git worktree add /tmp/repfx-base <commit>           # the tree to compare with
    python benchmarks/bench_fold_time.py --baseline /tmp/repfx-base

Each measurement runs in a fresh subprocess that imports repfx from one tree, folds a tiny model
once (one-time import and kernel costs), builds a model (same seed for both trees), and times
``repfx.fold(model, (x,))`` — capture, shape propagation, the pass pipeline (the part the
commit point adds to) and the verification against the original (without the second
verification on re-drawn parameters, which older trees do not have). The two trees
alternate, and the median of ``--repeats`` runs is reported with their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Runs in the child: argv = tree, model name. Prints the fold time in seconds as JSON.
CHILD = r"""
import json, sys, time
tree, name = sys.argv[1], sys.argv[2]
sys.path[:0] = [tree, tree + '/benchmarks']  # each tree's own model builders
import torch
torch.set_num_threads(1)
import inspect
import repfx
# verification as repfx.fold does it by default, less what only newer trees have
params = inspect.signature(repfx.fold).parameters
options = {{"verify_redrawn": False}} if "verify_redrawn" in params else {{}}
warm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
repfx.fold(warm, (torch.randn(1, 3, 8, 8),), **options)  # one-time import / kernel costs
if name == "riformer_s12":
    from repfx.models import create
    model, x = create("riformer_s12"), torch.randn(1, 3, 224, 224)
elif name == "resnet50":
    import timm
    from bench_timm_reparam import redraw_
    model, x = redraw_(timm.create_model("resnet50"), 0).eval(), torch.randn(1, 3, 224, 224)
elif name.startswith("repvgg_chain_"):
    from bench_timm_reparam import build_chain
    depth = int(name.rsplit("_", 1)[1])
    model, x = build_chain("timm", depth, 16, 0), torch.randn(1, 16, 8, 8)
else:
    raise SystemExit(f"unknown model {{name}}")
model.eval()
start = time.perf_counter()
folded = repfx.fold(model, (x,), **options)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def measure(tree: Path, name: str) -> float:
    code = CHILD.format()
    out = subprocess.run(
        [sys.executable, "-c", code, str(tree), name], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other repfx tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--models", nargs="+", default=["riformer_s12", "resnet50", "repvgg_chain_800"]
    )
    args = parser.parse_args(argv)
    print("| model | baseline (s) | this tree (s) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name in args.models:
        base, this = [], []
        for _ in range(args.repeats):
            base.append(measure(args.baseline, name))
            this.append(measure(ROOT, name))
        b, t = statistics.median(base), statistics.median(this)
        print(f"| {name} | {b:.2f} | {t:.2f} | {t / b:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
