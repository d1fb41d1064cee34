"""Sweep a zoo of third-party models through ``repfx.fold`` and tabulate what happens.

The zoo: one model per timm family (``timm.list_modules()``; per module, the smallest-sounding
name: ``*_tiny``, ``*_nano``, ``*_s``, ... before longer names) and torchvision's
classification, detection and segmentation lists, and HuggingFace transformers architectures
built from small configs (``benchmarks/zoo_hf.py``: an example batch of 1, a fresh batch of
3). Each model runs in its own subprocess (a crash, a hang or
a memory blow-up costs that model only; ``--timeout`` seconds each) and is:

1. built with random weights (no downloads), every parameter and BN statistic re-drawn at O(1)
   (``tests/grammar.randomise_``), in eval mode;
2. folded on a batch of 2 at its default input size (``pretrained_cfg``; 224×224 for
   torchvision classifiers, two 160×160 images for detectors), verified as given;
3. compared with the original on a fresh batch of 3 (detectors: of 2 other images), per
   output, as repfx's verifier compares (``repfx.proof.verify.verify``: an output that misses its
   tolerance is re-checked against float64 truth with the float64 fold; outputs after NMS are
   "not verifiable" where the original itself jumps).

Columns: which front end captured it (``fx``, ``export``, ``as is`` — neither captured the
top-level forward, its children were folded), batch norms (modules, and calls in graphs)
before → after, per-channel-affine ops before → after (counted in the graphs), multiplies by
a stored per-channel tensor before → after (counted on the fresh input as they run), whether
the folded module returns the original's output type (the pytree structure on the fresh
input), the
verification summary, the verdict on the fresh input (and its largest relative error), fold
seconds, and an error class for failures (``repfx.<Error>`` is a refusal with a message;
anything else is a raw exception, a bug).

``python benchmarks/zoo.py --out zoo.jsonl`` writes one JSON object per model and prints a
Markdown table; ``--only NAME ...`` sweeps the given models; ``--list`` prints the zoo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "_s", "t8")

TORCHVISION_CLASSIFIERS = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
    "mobilenet_v3_small", "regnet_x_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "squeezenet1_0", "swin_t", "vgg11_bn", "vit_b_16", "wide_resnet50_2",
]  # fmt: skip
TORCHVISION_DETECTORS = [
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fcos_resnet50_fpn", "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large", "ssd300_vgg16", "maskrcnn_resnet50_fpn",
    "keypointrcnn_resnet50_fpn",
]  # fmt: skip


def timm_zoo() -> list[str]:
    import timm

    chosen = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if names:
            chosen.append(f"timm:{min(names, key=_size_rank)}")
    return chosen


def _size_rank(name: str) -> tuple[int, int, str]:
    rank = next((i for i, word in enumerate(SIZE_WORDS) if word in name), len(SIZE_WORDS))
    return rank, len(name), name


TORCHVISION_SEGMENTERS = [
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50",
]  # fmt: skip


def zoo() -> list[str]:
    from zoo_hf import NAMES

    return [
        *timm_zoo(),
        *(f"tv:{n}" for n in TORCHVISION_CLASSIFIERS),
        *(f"tvdet:{n}" for n in TORCHVISION_DETECTORS),
        *(f"tvseg:{n}" for n in TORCHVISION_SEGMENTERS),
        *(f"hf:{n}" for n in NAMES),
    ]


# ---------------------------------------------------------------------- one model (child)


def build(spec: str):
    import torch

    kind, name = spec.split(":", 1)
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        g = torch.Generator().manual_seed(0)
        return model, (torch.randn(2, *size, generator=g),), (torch.randn(3, *size),)
    if kind == "hf":
        from zoo_hf import build as build_hf

        return build_hf(name)
    from torchvision import models

    if kind == "tvseg":
        model = getattr(models.segmentation, name)(weights=None, weights_backbone=None)
        return model, (torch.randn(1, 3, 64, 64),), (torch.randn(3, 3, 64, 64),)
    if kind == "tv":
        model = getattr(models, name)(weights=None)
        size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
        return model, (torch.randn(2, *size),), (torch.randn(3, *size),)
    model = getattr(models.detection, name)(weights=None, weights_backbone=None)
    images = [torch.rand(3, 160, 160) for _ in range(2)]
    return model, (images,), ([torch.rand(3, 160, 160) for _ in range(2)],)


def sweep_one(spec: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from grammar import randomise_
    from helpers import batch_norms, stored_multiplies
    from torch.utils._pytree import tree_structure

    import repfx
    from repfx.ir.op_kinds import op_counts
    from repfx.proof.verify import float64_inputs, verify

    torch.set_num_threads(1)
    row: dict = {"model": spec}
    model, example, fresh = build(spec)
    randomise_(model, torch.Generator().manual_seed(0)).eval()
    started = time.perf_counter()
    try:
        folded = repfx.fold(model, example, verify_redrawn=False)
    except repfx.VerificationError as exc:
        failed = exc.report.failed_verification()
        lines = [line.strip() for line in failed.lines()[1:] if "FAILED" in line]
        row.update(error="repfx.VerificationError", message="; ".join(lines)[:600])
        return row
    except repfx.Error as exc:
        row.update(error=f"repfx.{type(exc).__name__}", message=str(exc).splitlines()[0][:300])
        return row
    except Exception as exc:
        row.update(error=f"raw {type(exc).__name__}", message=str(exc).splitlines()[0][:300])
        return row
    row["fold_s"] = round(time.perf_counter() - started, 2)
    report = folded.meta[repfx.REPORT_KEY]
    row["front_end"] = _front_end(report)
    row["before"] = {**_counts(report.before.ops), "batch_norm": batch_norms(model)}
    row["after"] = {**_counts(_all_ops(folded, op_counts)), "batch_norm": batch_norms(folded)}
    row["verification"] = report.verification.summary() if report.verification else None
    # the fresh input, judged as repfx's verifier judges (per output; an output that misses
    # its tolerance is re-checked against float64 truth with the float64 fold)
    example64 = float64_inputs(example)
    check = verify(model, folded, fresh, lambda m64: repfx.fold(m64, example64, verify=False))
    with torch.no_grad():
        row["type_kept"] = tree_structure(folded(*fresh)) == tree_structure(model(*fresh))
    row["stored_mul"] = [len(stored_multiplies(m, *fresh)) for m in (model, folded)]
    row["fresh"] = check.summary()
    row["fresh_passed"] = check.passed
    row["fresh_rel_error"] = check.max_rel_error
    return row


def _front_end(report) -> str:
    if "forward" in report.opaque_modules:
        return "as is"
    return "export" if any("torch.export" in n for n in report.notes) else "fx"


def _counts(ops: dict) -> dict:
    return {k: ops.get(k, 0) for k in ("batch_norm", "channel_affine", "conv", "linear")}


def _all_ops(folded, op_counts) -> dict:
    """Op counts over the folded model and every folded graph inside it."""
    import torch

    total: dict = {}
    for m in folded.modules():
        if isinstance(m, torch.fx.GraphModule):
            for kind, count in op_counts(m).items():
                total[kind] = total.get(kind, 0) + count
    return total


# ---------------------------------------------------------------------------- driver


def run(spec: str, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", spec]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": spec, "error": "timeout", "message": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"model": spec, "error": f"crash (exit {done.returncode})", "message": tail}
    return json.loads(lines[-1])


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | front end | BN | affine | stored × | output type | verification | "
        "fresh input | fold s | error |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | | | {r['error']}: {r['message'][:80]} |")
            continue
        stored = "{} → {}".format(*r.get("stored_mul", ("?", "?")))
        kept = {True: "kept", False: "CHANGED"}.get(r.get("type_kept"), "?")
        b, a = r["before"], r["after"]
        verification = (r["verification"] or "").split(":")[0].removeprefix("verification ")
        fresh = f"{'ok' if r['fresh_passed'] else 'FAILED'}, max rel {r['fresh_rel_error']:.1e}"
        lines.append(
            f"| {r['model']} | {r['front_end']} | {b['batch_norm']} → {a['batch_norm']} | "
            f"{b['channel_affine']} → {a['channel_affine']} | {stored} | {kept} | "
            f"{verification} | {fresh} | "
            f"{r['fold_s']} | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    kinds = "timm:NAME, tv:NAME, tvdet:NAME, tvseg:NAME, hf:NAME"
    parser.add_argument("--only", nargs="+", metavar="SPEC", help=kinds)
    parser.add_argument("--list", action="store_true", help="print the zoo and exit")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, help="append one JSON object per model here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(sweep_one(args.child)))
        return
    specs = args.only or zoo()
    if args.list:
        print("\n".join(specs))
        return
    rows = []
    for spec in specs:
        row = run(spec, args.timeout)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
