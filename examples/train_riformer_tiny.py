"""Train a tiny RIFormer with the paper's recipe, then fold its token mixers away with repfx.

    python examples/train_riformer_tiny.py            # about 75 s on one CPU thread
    python examples/train_riformer_tiny.py --quick    # about 10 s (smoke test)

Steps:

1. A synthetic 4-class image task (stripes in three orientations and a checkerboard, random
   frequency, phase, tint and noise), generated on the fly: nothing is downloaded.
2. A tiny PoolFormer teacher is trained briefly on the labels. A trained teacher (rather than a
   fixed random one) makes the label-free distillation meaningful: the student never sees a
   label, so its accuracy only comes from what the teacher learnt.
3. A tiny RIFormer student of the same macro structure is initialised from the teacher (all
   but the token mixer, :func:`repfx.recipes.riformer.init_student_from_teacher`) and trained with
   ``L = L_soft + λ1·L'_in + λ2·L_out + λ3·L_rel`` (:class:`RIFormerDistiller`), label-free.
4. ``repfx.fold`` turns the student into its deploy form (no token mixer); predictions on the
   eval set are compared (identical) and eager latency is measured, interleaved, median.

The loss weights are given as ``λ·B`` products as in the paper's Table 10 (defaults: S12).
The learning rate is larger than the paper's ``1e-3·B/1024`` because the schedule is a few
hundred steps instead of 600 epochs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import repfx
from repfx.models import create
from repfx.recipes.riformer import LossWeights, RIFormerDistiller, init_student_from_teacher

NUM_CLASSES = 4


# --------------------------------------------------------------------------- data


def synthetic_batch(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` images ``(3, size, size)`` and labels: 0 horizontal, 1 vertical, 2 diagonal
    stripes, 3 checkerboard; random frequency, phase, colour tint, contrast and noise."""
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = (2.0 + 4.0 * torch.rand(n, 1, 1, generator=gen)) * 2 * math.pi
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
    horiz = torch.sin(freq * yy + phase)
    vert = torch.sin(freq * xx + phase)
    diag = torch.sin(freq * (xx + yy) / math.sqrt(2) + phase)
    check = torch.sign(horiz) * torch.sign(vert)
    patterns = torch.stack([horiz, vert, diag, check], dim=1)  # (n, 4, H, W)
    pattern = patterns[torch.arange(n), labels]
    tint = 0.5 + torch.rand(n, 3, 1, 1, generator=gen)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
    images = contrast * tint * pattern.unsqueeze(1)
    images = images + 0.3 * torch.randn(n, 3, size, size, generator=gen)
    return images, labels


# --------------------------------------------------------------------------- helpers


class Progress:
    """A plain progress bar on stderr: ``label [#####.....] step/total  key=value``, redrawn in
    place on a terminal; elsewhere (a log file, a pipe, CI) one plain line per tenth of the
    run, so that the log holds a readable record instead of carriage returns."""

    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 30) -> None:
        self.label, self.total, self.enabled, self.width = label, total, enabled, width
        self.start = time.perf_counter()
        self.in_place = sys.stderr.isatty()
        self._tenths_shown = -1

    def update(self, step: int, **info: float) -> None:
        if not self.enabled:
            return
        done = int(self.width * step / max(self.total, 1))
        bar = "#" * done + "." * (self.width - done)
        extra = "  ".join(f"{k}={v:.4g}" for k, v in info.items())
        elapsed = time.perf_counter() - self.start
        line = f"{self.label} [{bar}] {step}/{self.total} {elapsed:5.1f}s  {extra}"
        if self.in_place:
            sys.stderr.write(f"\r{line}" + ("\n" if step >= self.total else ""))
        else:
            tenths = 10 * step // max(self.total, 1)
            if tenths == self._tenths_shown:
                return
            self._tenths_shown = tenths
            sys.stderr.write(line.rstrip() + "\n")
        sys.stderr.flush()


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    warmup = max(1, total // 20)
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    return torch.cat(
        [model(images[i : i + batch]).argmax(-1) for i in range(0, len(images), batch)]
    )


def eager_latency(
    models: Sequence[nn.Module], x: Tensor, reps: int, warmup: int = 3
) -> list[float]:
    """Median seconds per forward of each model, runs interleaved so drift hits all equally."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for _ in range(warmup):
            for m in models:
                m(x)
        for _ in range(reps):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


# --------------------------------------------------------------------------- training


def train_teacher(args: argparse.Namespace, gen: torch.Generator) -> nn.Module:
    teacher = create("poolformer_tiny", num_classes=NUM_CLASSES)
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr, weight_decay=0.05)
    bar = Progress("teacher", args.teacher_steps, enabled=not args.no_progress)
    for step in range(args.teacher_steps):
        cosine_lr(opt, args.lr, step, args.teacher_steps)
        images, labels = synthetic_batch(args.batch_size, args.image_size, gen)
        loss = F.cross_entropy(teacher(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(step + 1, ce=loss.item())
    return teacher.eval()


def train_student(
    args: argparse.Namespace, teacher: nn.Module, gen: torch.Generator
) -> tuple[nn.Module, dict[str, list[float]]]:
    student = create("riformer_tiny", num_classes=NUM_CLASSES)
    report = init_student_from_teacher(student, teacher)
    log(args, f"student init: {report}")
    weights = LossWeights(in_b=args.lambda_in_b, out_b=args.lambda_out_b, rel_b=args.lambda_rel_b)
    distiller = RIFormerDistiller(
        student, teacher, weights=weights, temperature=args.temperature, out_input=args.out_input
    )
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.05)
    history: dict[str, list[float]] = {"loss": [], "kd": [], "in": [], "out": [], "rel": []}
    bar = Progress("student", args.steps, enabled=not args.no_progress)
    for step in range(args.steps):
        cosine_lr(opt, args.lr, step, args.steps)
        images, _ = synthetic_batch(args.batch_size, args.image_size, gen)  # labels unused
        out = distiller(images)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        history["loss"].append(out.loss.item())
        for k, v in out.terms.items():
            history[k].append(v.item())
        bar.update(step + 1, loss=out.loss.item(), L_out=out.terms["out"].item())
    return student.eval(), history


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.silent:
        print(msg, flush=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="student distillation steps")
    p.add_argument("--teacher-steps", type=int, default=400, help="teacher training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lambda-in-b", type=float, default=1e-4, help="λ1·B (paper S12: 1e-4)")
    p.add_argument("--lambda-out-b", type=float, default=1e-3, help="λ2·B (paper S12: 1e-3)")
    p.add_argument("--lambda-rel-b", type=float, default=1.0, help="λ3·B (paper S12: 1.0)")
    p.add_argument(
        "--out-input",
        choices=("own", "teacher"),
        default="teacher",
        help="L_out's student input: the teacher's N(T^t_m) (module imitation) or its own",
    )
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--latency-reps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="a few seconds: tiny schedule")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--silent", action="store_true", help="print nothing (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.teacher_steps = min(args.steps, 60), min(args.teacher_steps, 60)
        args.eval_size, args.latency_reps = min(args.eval_size, 128), min(args.latency_reps, 5)
        args.latency_batch = min(args.latency_batch, 16)
    if args.silent:
        args.no_progress = True
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the whole example; returns the numbers it prints (used by the tests)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()

    teacher = train_teacher(args, gen)
    eval_images, eval_labels = synthetic_batch(
        args.eval_size, args.image_size, torch.Generator().manual_seed(args.seed + 1)
    )
    teacher_acc = (predict(teacher, eval_images) == eval_labels).float().mean().item()
    log(args, f"teacher (PoolFormer-tiny) accuracy: {teacher_acc:.3f}")

    student, history = train_student(args, teacher, gen)
    pred = predict(student, eval_images)
    acc = (pred == eval_labels).float().mean().item()

    folded = repfx.fold(student, eval_images[:8])
    folded_pred = predict(folded, eval_images)
    folded_acc = (folded_pred == eval_labels).float().mean().item()
    same = bool(torch.equal(pred, folded_pred))
    mixers_left = sum(1 for n, _ in folded.named_modules() if n.endswith("token_mixer"))

    x = eval_images[: args.latency_batch]
    lat_eager, lat_folded = eager_latency([student, folded], x, args.latency_reps)

    k = max(1, min(20, len(history["out"]) // 4))
    l_out_first = statistics.fmean(history["out"][:k])
    l_out_last = statistics.fmean(history["out"][-k:])
    results = {
        "teacher_accuracy": teacher_acc,
        "accuracy": acc,
        "folded_accuracy": folded_acc,
        "predictions_identical": same,
        "token_mixers_after_fold": mixers_left,
        "l_out_first": l_out_first,
        "l_out_last": l_out_last,
        "history": history,
        "latency_ms": lat_eager * 1e3,
        "folded_latency_ms": lat_folded * 1e3,
        "seconds": time.perf_counter() - t_start,
    }
    log(args, f"imitation loss L_out: {l_out_first:.4g} (first {k} steps) -> {l_out_last:.4g}")
    log(args, f"student (RIFormer-tiny) accuracy: {acc:.3f}   folded: {folded_acc:.3f}")
    log(args, f"predictions identical after folding: {same} ({len(pred)} images)")
    log(
        args,
        f"eager latency, batch {len(x)}, median of {args.latency_reps} interleaved runs: "
        f"{lat_eager * 1e3:.2f} ms -> folded {lat_folded * 1e3:.2f} ms "
        f"({lat_eager / lat_folded:.2f}x)",
    )
    log(args, f"total {results['seconds']:.1f}s")
    return results


if __name__ == "__main__":
    main()
