"""What a default ``repfx.fold(model, (x,))`` costs against one forward pass of the model.

    python benchmarks/bench_fold_cost.py                       # the default models, verified
    python benchmarks/bench_fold_cost.py --no-verify           # verify=False
    python benchmarks/bench_fold_cost.py --models timm:resnet50 --markdown
    python benchmarks/bench_fold_cost.py --models llama:1b --no-verify  # 1.1B, bfloat16

``llama:1b`` is a LLaMA-style decoder built from a config (TinyLlama's sizes: hidden 2048, 22
layers, 32 heads, 4 key / value heads, MLP 5632, vocabulary 32000; 1.1B parameters), no
weights, bfloat16, its RMSNorm weights re-drawn at O(1), folded with ``fold_norm_affine=True``
on 16 token ids; ``llama:tiny`` the same at toy sizes.

Each model runs in a fresh process, on one thread: it is built (random weights, its foldable
parameters re-drawn at O(1), eval mode), one forward pass is timed (the median of five passes
before the fold and five after it, after two warm-up passes), and ``repfx.fold`` is timed once
while a sampling thread reads the process's resident memory every 2 ms. Reported per model:
fold time / forward time, and the fold's extra peak memory (highest resident memory during the
fold, less the resident memory just before it) / the model's parameter and buffer bytes — the
two ratios the fold's cost is judged by — and, after the measurement, the folded model's
largest relative error against the original on a fresh input of another batch size, per
output, with the tolerance of its dtype, and how far each of the two is from float64 truth
there (the original run in float64): on an ill-conditioned model the two low-precision runs
differ by their rounding, which the second figure shows to be the original's own.
The ratios come from the same process, so they do not depend on how busy the machine is as
much as raw seconds do; run it on a quiet machine all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODELS = (
    "timm:resnet50",
    "timm:efficientnet_b3",
    "timm:convnext_small",
    "timm:vit_base_patch16_224",
    "riformer_s12",
)


def measure(spec: str, verify: bool) -> dict:
    """Build ``spec``, time one forward and one fold, sample memory during the fold."""
    import copy
    import statistics
    import time

    import torch

    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from timm_weights import redraw_foldable_parameters_

    import repfx

    model, x, fresh, options = _build(spec)
    model = redraw_foldable_parameters_(model, seed=0).eval()
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    warm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    repfx.fold(warm, (torch.randn(1, 3, 8, 8),))  # one-time import and kernel costs

    def forwards(times: list[float]) -> None:
        with torch.no_grad():
            for _ in range(FORWARDS_EACH_SIDE):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)

    with torch.no_grad():
        for _ in range(2):
            model(x)
    times: list[float] = []
    forwards(times)
    sampler = _PeakSampler()
    baseline = _resident_bytes()
    with sampler:
        start = time.perf_counter()
        folded = repfx.fold(model, (x,), verify=verify, **options)
        seconds = time.perf_counter() - start
    forwards(times)  # (both sides of the fold: a change of load during it moves both)
    forward = statistics.median(times)
    from repfx.proof.tolerances import max_errors, output_tensors, reference_dtype, tolerance_for
    from repfx.proof.verify import float64_inputs

    with torch.no_grad():
        expected, actual = model(fresh), folded(fresh)
        _, rel_error = max_errors(actual, expected)
        del folded
        # float64 truth, on the same fresh input
        truth = copy.deepcopy(model).double()(*float64_inputs((fresh,)))
        _, fold_vs_truth = max_errors(actual, truth)
        _, original_vs_truth = max_errors(expected, truth)
    return {
        "model": spec,
        "verify": verify,
        "forward_s": forward,
        "fold_s": seconds,
        "fold_per_forward": seconds / forward,
        "model_bytes": nbytes,
        "extra_peak_bytes": max(sampler.peak - baseline, 0),
        "extra_peak_per_model_bytes": max(sampler.peak - baseline, 0) / nbytes,
        "fresh_rel_error": rel_error,
        "tolerance": tolerance_for(reference_dtype(output_tensors(expected))),
        "fold_vs_float64": fold_vs_truth,
        "original_vs_float64": original_vs_truth,
    }


FORWARDS_EACH_SIDE = 5  # forward passes timed before the fold, and again after it

LLAMA_SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=256),
}  # fmt: skip


def _build(spec: str):
    """The model, its example input (batch 1), a fresh input of another batch size, and the
    fold's options."""
    import torch

    torch.manual_seed(0)  # models initialise from the global generator: the same model each run

    def image(batch: int, size: tuple, seed: int) -> torch.Tensor:
        return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))

    if spec.startswith("llama:"):
        import transformers

        sizes = LLAMA_SIZES[spec.removeprefix("llama:")]
        config = transformers.LlamaConfig(**sizes, use_cache=False)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)

        def ids(batch: int, length: int, seed: int) -> torch.Tensor:
            gen = torch.Generator().manual_seed(seed)
            return torch.randint(0, sizes["vocab_size"], (batch, length), generator=gen)

        return model, ids(1, 16, 0), ids(2, 23, 1), {"fold_norm_affine": True}
    if spec.startswith("timm:"):
        import timm

        model = timm.create_model(spec.removeprefix("timm:"))
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return model, image(1, size, 0), image(3, size, 1), {}
    from repfx.models import create

    size = (3, 224, 224)
    return create(spec), image(1, size, 0), image(3, size, 1), {}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler:
    """The highest resident memory seen while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _resident_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())


def run_child(spec: str, verify: bool) -> dict:
    """:func:`measure` in a fresh process (one model per process: memory starts clean)."""
    args = [sys.executable, __file__, "--child", spec] + ([] if verify else ["--no-verify"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"model": spec, "verify": verify, "error": done.stderr.strip()[-500:]}
    return json.loads(lines[-1])


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | verify | forward | fold | fold / forward | extra peak memory / model bytes "
        "| fresh input: fold vs original (tolerance) | fold / original vs float64 truth |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['verify']} | error: {r['error'][-80:]} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {'yes' if r['verify'] else 'no'} | {r['forward_s'] * 1e3:.0f} ms "
            f"| {r['fold_s']:.1f} s | {r['fold_per_forward']:.0f}× "
            f"| {r['extra_peak_per_model_bytes']:.1f}× ({r['extra_peak_bytes'] / 1e6:.0f} MB) "
            f"| {r['fresh_rel_error']:.1e} ({r['tolerance']:.0e}) "
            f"| {r['fold_vs_float64']:.1e} / {r['original_vs_float64']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--no-verify", action="store_true", help="fold with verify=False")
    parser.add_argument("--markdown", action="store_true", help="print a table for RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, not args.no_verify)))
        return
    rows = []
    for spec in args.models:
        rows.append(run_child(spec, not args.no_verify))
        print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
