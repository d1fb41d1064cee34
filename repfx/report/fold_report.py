"""What a fold did, and why it did not do more.

A :class:`FoldReport` is attached to every folded model as ``folded.meta["repfx_report"]``.
Passes produce :class:`Folded` and :class:`Skipped` records and return them; nothing here is
global state.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import fx, nn

from ..ir.graph import is_guard
from ..ir.norms import NORMS
from ..ir.op_kinds import op_counts
from .sketch import GraphSketch


@dataclass(frozen=True)
class Folded:
    rule: str
    where: str
    detail: str
    # the region it replaced read a parameter, buffer or constant, so its proof held for their
    # values as given (repfx.proof.region.reads_module_state); unknown counts as read
    reads_state: bool = field(default=True, compare=False)


@dataclass(frozen=True)
class Skipped:
    rule: str
    where: str
    reason: str


# Verdicts of one output (OutputComparison.verdict).
OK = "ok"
ILL_CONDITIONED = "ok: ill-conditioned"  # missed its tolerance; the float64 re-check explains it
FAILED = "FAILED"
# differs, but the original itself jumps at these inputs (a threshold, a sort, NMS): a 1-ulp
# perturbation of its weights moves this output as far; nothing at these inputs can tell a
# correct fold from a wrong one (every rewrite was still validated locally at its commit point)
DISCONTINUOUS = "not verifiable: discontinuous here"

NOT_VERIFIED = "verification: none, nothing was verified (no example inputs, or verify=False)"

# Labels of the two verifications a fold makes (Verification.label).
AS_GIVEN = "as given"
REDRAWN = "re-drawn parameters"


@dataclass(frozen=True)
class Float64Recheck:
    """One output that missed its tolerance, checked against float64 truth (``repfx.proof.verify``).

    Relative errors, on the output's own scale. ``sensitivity`` is measured only when
    ``fold_error`` exceeds the float64 floor; ``original_rounding`` … ``rounding_criterion`` only
    for a low-precision output."""

    fold_error: float  # the float64 fold vs the float64 original
    criterion: float  # fold_error must be ≤ this (repfx.proof.tolerances.float64_criterion)
    sensitivity: float | None = None  # the float64 original's move under a 1-ulp perturbation
    original_rounding: float | None = None  # the low-precision original vs float64 truth
    folded_rounding: float | None = None  # the low-precision fold vs float64 truth (not judged)
    weight_rounding: float | None = None  # the fold's rounded weights, run in float64, vs truth
    rounding_criterion: float | None = None  # weight_rounding must be ≤ this
    discontinuous: bool = False  # sensitivity ≥ repfx.proof.tolerances.DISCONTINUITY


@dataclass(frozen=True)
class OutputComparison:
    """One output tensor of the fold against the same output of the original."""

    path: str  # its pytree path: "output" for a lone tensor, "[1]", "['logits']"
    dtype: str
    abs_error: float | None  # max |folded − original| where both are finite (None: not comparable)
    rel_error: float | None  # abs_error / max |original| of this output
    tolerance: float  # of this output's dtype (0: compared exactly)
    verdict: str  # OK, ILL_CONDITIONED, DISCONTINUOUS or FAILED
    problem: str = ""  # why it failed
    nonfinite_mismatches: int = 0  # positions where NaN / Inf differ
    recheck: Float64Recheck | None = None
    scale: float | None = None  # max |original| of this output: what rel_error is relative to

    @property
    def passed(self) -> bool:
        return self.verdict != FAILED

    def line(self) -> str:
        if self.rel_error is None:
            numbers = "not comparable"
        else:
            numbers = relative_error_text(self.rel_error, self.tolerance)
            numbers += absolute_error_text(self.abs_error, self.scale)
        text = f"{self.path} ({self.dtype}): {numbers}: {self.verdict}"
        if self.problem:
            text += f": {self.problem}"
        if self.recheck is not None:
            text += "\n      " + _recheck_text(self.recheck, self.dtype, self.passed)
        return text


def relative_error_text(rel_error: float, tolerance: float) -> str:
    """``relative error 3.9e-07 ≤ 1e-05``: the figure a verdict is judged by, first."""
    judged = "≤" if rel_error <= tolerance else ">"
    return f"relative error {rel_error:.2g} {judged} {tolerance:.1g}"


def absolute_error_text(abs_error: float | None, scale: float | None) -> str:
    """`` (largest difference 0.25 on values up to 6.4e+05)``: an absolute figure, always with
    the scale it is measured against, so that it does not read as an error of its own."""
    if not abs_error:  # not comparable, or no difference at all
        return ""
    if scale is None:
        return f" (largest difference {abs_error:.2g})"
    return f" (largest difference {abs_error:.2g} on values up to {scale:.2g})"


def _recheck_text(r: Float64Recheck, dtype: str, passed: bool) -> str:
    judged = f"float64 fold off by {r.fold_error:.3g} (≤ {r.criterion:.3g} allowed"
    if r.sensitivity is not None:
        judged += f": the float64 original moves by {r.sensitivity:.3g} under a 1-ulp perturbation"
    text = judged + ")"
    if r.weight_rounding is not None:
        text += (
            f"; against float64 truth the original is off by {r.original_rounding:.3g}, the fold "
            f"by {r.folded_rounding:.3g}, its rounded weights alone by {r.weight_rounding:.3g} "
            f"(≤ {r.rounding_criterion:.3g} allowed)"
        )
    if r.discontinuous:
        text = f"the original jumps here: {text}"
    elif passed:
        text = f"the {dtype} difference is explained by ill-conditioning: {text}"
    return text


@dataclass(frozen=True)
class Verification:
    """The fold against the original on the example inputs, every output on its own scale."""

    label: str  # AS_GIVEN, or REDRAWN (a copy with its foldable parameters re-drawn at O(1))
    passed: bool
    outputs: tuple[OutputComparison, ...]
    max_abs_error: float  # the largest per-output abs error
    max_rel_error: float  # the largest per-output relative error (each on its own scale)
    tolerance: float  # of the least precise output dtype
    problem: str = ""  # a mismatch of the whole output structure (no per-output records then)
    abs_error_scale: float | None = None  # the scale of the output with the largest abs error
    calls: int = 1  # 2: a fold that may write, compared on a second call too

    @staticmethod
    def of(
        label: str,
        outputs: tuple[OutputComparison, ...],
        tolerance: float,
        problem: str = "",
        calls: int = 1,
    ) -> Verification:
        comparable = [o for o in outputs if o.rel_error is not None]
        largest = max(comparable, key=lambda o: o.abs_error, default=None)
        return Verification(
            label=label,
            passed=not problem and all(o.passed for o in outputs),
            outputs=outputs,
            max_abs_error=largest.abs_error if largest else 0.0,
            max_rel_error=max((o.rel_error for o in comparable), default=0.0),
            tolerance=tolerance,
            problem=problem,
            abs_error_scale=largest.scale if largest else None,
            calls=calls,
        )

    def summary(self) -> str:
        """One line: the verdict, the label, the worst relative error against the tolerance (what
        the verdict is judged by), then the largest absolute difference with its scale."""
        verdict = "ok" if self.passed else "FAILED"
        head = f"verification {verdict} ({self.label})"
        if self.problem:
            return f"{head}: {self.problem}"
        count = f"{len(self.outputs)} output{'s' if len(self.outputs) != 1 else ''}"
        if self.calls > 1:
            count += f" over {self.calls} calls"
        text = f"{head}: {count}, " + relative_error_text(self.max_rel_error, self.tolerance)
        text += absolute_error_text(self.max_abs_error, self.abs_error_scale)
        failed = sum(not o.passed for o in self.outputs)
        explained = sum(o.verdict == ILL_CONDITIONED for o in self.outputs)
        jumps = sum(o.verdict == DISCONTINUOUS for o in self.outputs)
        if failed:
            text += f", {failed} failed"
        if explained:
            text += f", {explained} explained by ill-conditioning (float64 re-check)"
        if jumps:
            text += (
                f", {jumps} not verifiable (the original jumps at these inputs under a 1-ulp "
                "perturbation of its weights: a threshold, a sort, NMS)"
            )
        return text

    def lines(self) -> list[str]:
        """The summary, then one line per output unless every output simply passed."""
        lines = [self.summary()]
        if any(o.verdict != OK for o in self.outputs):
            lines += [f"  {o.line()}" for o in self.outputs]
        return lines


@dataclass(frozen=True)
class GraphStats:
    parameters: int  # numel of parameters
    buffers: int  # numel of buffers
    nodes: int  # compute nodes (calls), excluding placeholders, attributes and output
    ops: dict[str, int]  # count of recognised op kinds, see repfx.ir.op_kinds.op_kind

    @staticmethod
    def of(gm: fx.GraphModule, module: nn.Module | None = None) -> GraphStats:
        module = gm if module is None else module
        calls = [n for n in gm.graph.nodes if n.op.startswith("call_") and not is_guard(n)]
        return GraphStats(
            parameters=sum(p.numel() for p in module.parameters()),
            buffers=sum(b.numel() for b in module.buffers()),
            nodes=len(calls),
            ops=dict(op_counts(gm)),
        )


# Plain words for op kinds (repfx.ir.op_kinds.op_kind); a rule's are its pass's ``words``.
OP_WORDS = {
    "conv": "conv",
    "conv_transpose": "transposed conv",
    "linear": "linear",
    "batch_norm": "batch norm",
    **{norm.kind: norm.words for norm in NORMS},
    "channel_affine": "per-channel multiply / add",
    "no_op": "no-op (dropout, identity)",
}
# Reasons a user can act on (remove a hook, untie a module, call eval(), pass example inputs,
# convert a dtype, report a bug); every other reason describes how the model is built.
_ACTIONABLE = (
    "hooks", "shared", "call sites", "training mode", "example inputs", "rejected by local "
    "validation", "cannot be validated", "denied", "mutated in place", "constants are",
)  # fmt: skip


def actionable(skip: Skipped) -> bool:
    """Could the user change something so that this candidate folds?"""
    return skip.rule == "capture" or any(marker in skip.reason for marker in _ACTIONABLE)


_DECIMAL = re.compile(r"[(\[]?[-+]?\d+\.\d+(?:[eE][-+]?\d+)?[),;:]*")


def pattern(text: str) -> str:
    """``text`` with block indices and node counters wildcarded, so that repeated blocks read
    as one: ``stages.2.blocks.11.norm1:mul_23`` → ``stages.*.blocks.*.norm1:mul``; decimal
    numbers (``max rel 1.0``) are left as they are."""
    return re.sub(r"\S+", lambda m: _wildcard(m.group()), text)


def _wildcard(word: str) -> str:
    if _DECIMAL.fullmatch(word):
        return word
    word = re.sub(r"(?<=[.\[])\d+(?=[.\]:]|$)", "*", word)
    return re.sub(r"(?<=[A-Za-z])_\d+\b", "", word)


def grouped(records: list[tuple[str, str, str]]) -> list[tuple[int, str, str, str]]:
    """(count, rule, where, what) for records (rule, where, what) that read alike once their
    indices are wildcarded, most frequent first."""
    counts = Counter((rule, pattern(where), pattern(what)) for rule, where, what in records)
    return [(n, *key) for key, n in counts.most_common()]


@dataclass
class FoldReport:
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    before: GraphStats | None = None
    after: GraphStats | None = None
    verification: Verification | None = None  # the fold of the model as given (AS_GIVEN)
    redrawn_verification: Verification | None = None  # a copy with re-drawn parameters (REDRAWN)
    opaque_modules: dict[str, str] = field(default_factory=dict)  # path -> why not traced
    notes: list[str] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)  # pass -> time it ran, summed
    # the graph as captured and as folded (repfx.report.sketch), for draw() (repfx.report.draw);
    # not part of to_dict()
    before_sketch: GraphSketch | None = field(default=None, repr=False)
    after_sketch: GraphSketch | None = field(default=None, repr=False)
    # each rule's plain words (its pass's ``words``), for the text; not part of to_dict()
    rule_words: dict[str, str] = field(default_factory=dict, repr=False)

    def draw(self, path: str | os.PathLike, block: str | None = None) -> str:
        """Draw one folded block before and after into ``path`` (SVG, PNG, PDF: by its
        suffix); returns the module path drawn. See ``repfx.report.draw``."""
        from .draw import draw  # local: matplotlib is optional, and imported only to draw

        return draw(self, path, block)

    def counts(self) -> dict[str, int]:
        """Number of folds per rule."""
        return dict(Counter(f.rule for f in self.folded))

    def add_pass_seconds(self, seconds: dict[str, float]) -> None:
        """Add each pass's running time (of one run of the pipeline) to ``pass_seconds``."""
        for name, spent in seconds.items():
            self.pass_seconds[name] = self.pass_seconds.get(name, 0.0) + spent

    # ------------------------------------------------------------------ reading

    def summary(self) -> str:
        """One line: ops before → after in words, parameters, the verification verdict."""
        parts = []
        if self.before and self.after:
            b, a = self.before, self.after
            removed = [
                f"{b.ops.get(k, 0) - a.ops.get(k, 0)} {OP_WORDS.get(k, k)}"
                for k in OP_WORDS
                if b.ops.get(k, 0) > a.ops.get(k, 0)
            ]
            parts.append(f"{b.nodes:,} → {a.nodes:,} ops")
            parts.append("removed " + ", ".join(removed) if removed else "nothing removed")
            parts.append(f"parameters {b.parameters:,} → {a.parameters:,}")
        else:
            parts.append(f"{len(self.folded)} folds")
        checks = self.verifications()
        if not checks:
            parts.append("not verified")
        else:
            verdict = "ok" if all(v.passed for v in checks) else "FAILED"
            parts.append(f"verification {verdict} ({len(checks)} checks)")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = ["repfx fold report", f"  {self.summary()}"]
        lines.extend(self._verification_lines())
        lines.extend(self._folded_lines())
        lines.extend(self._not_folded_lines())
        for path, why in self.opaque_modules.items():
            lines.append(f"  traced as a leaf: {path} ({why})")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.extend(self._op_lines())
        lines.extend(self._time_lines())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<repfx FoldReport: {self.summary()}>"

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>"

    def _folded_lines(self) -> list[str]:
        if not self.folded:
            return ["  folded: nothing"]
        lines = ["  folded:"]
        for rule, count in sorted(self.counts().items(), key=lambda kv: -kv[1]):
            lines.append(f"    {self.rule_words.get(rule, rule)} ({rule}): {count}")
        records = [(f.rule, f.where, f.detail) for f in self.folded if f.rule != "cleanup"]
        groups = grouped(records)
        for n, _, where, detail in groups[:_SHOWN]:
            lines.append(f"      {where}: {detail}" + (f"  (×{n})" if n > 1 else ""))
        if len(groups) > _SHOWN:
            lines.append(f"      … {len(groups) - _SHOWN} more (report.to_dict())")
        return lines

    def _not_folded_lines(self) -> list[str]:
        mine = [s for s in self.skipped if actionable(s)]
        lines = []
        if mine:
            lines.append("  not folded, and you could change that:")
            for n, rule, where, reason in grouped([(s.rule, s.where, s.reason) for s in mine]):
                lines.append(f"    {n:>4} × {rule} at {where}: {reason}")
        others = len(self.skipped) - len(mine)
        if others:
            lines.append(
                f"  {others} other candidate{'s' if others != 1 else ''} cannot fold as the "
                "model is built (explain(everything=True); CLI --explain --all)"
            )
        return lines

    def _op_lines(self) -> list[str]:
        if not (self.before and self.after):
            return []
        b, a = self.before, self.after
        rows = [
            (OP_WORDS.get(kind, kind), b.ops.get(kind, 0), a.ops.get(kind, 0))
            for kind in sorted(set(b.ops) | set(a.ops))
        ]
        if b.buffers or a.buffers:
            rows.append(("buffers (elements)", b.buffers, a.buffers))
        width = max(len(f"{before:,}") for _, before, _ in rows) if rows else 0
        lines = [f"  ops before → after (graph nodes {b.nodes:,} → {a.nodes:,}):"]
        for word, before, after in rows:
            lines.append(f"    {word:<27} {before:>{max(width, 5)},} → {after:,}")
        return lines

    def _time_lines(self) -> list[str]:
        if not self.pass_seconds:
            return []
        slowest = sorted(self.pass_seconds.items(), key=lambda kv: -kv[1])
        return ["  time per pass: " + ", ".join(f"{name} {s:.2f} s" for name, s in slowest)]

    def verifications(self) -> list[Verification]:
        """The verifications made: as given, then with re-drawn parameters."""
        return [v for v in (self.verification, self.redrawn_verification) if v is not None]

    def failed_verification(self) -> Verification | None:
        """The first verification that failed, if any."""
        return next((v for v in self.verifications() if not v.passed), None)

    def _verification_lines(self) -> list[str]:
        if self.verification is None:
            return [f"  {NOT_VERIFIED}"]
        return [f"  {line}" for v in self.verifications() for line in v.lines()]

    def explain(self, everything: bool = True) -> str:
        """The candidates that were not folded, one line each, with location and reason: every
        one, or (``everything=False``) those a user could act on, alike ones grouped. Never
        empty: when there is nothing to list, one line says why."""
        if not self.skipped:
            return "nothing was left: every candidate the passes found was folded"
        if everything:
            return "\n".join(f"{s.rule}: {s.where}: {s.reason}" for s in self.skipped)
        mine = [(s.rule, s.where, s.reason) for s in self.skipped if actionable(s)]
        if not mine:
            n = len(self.skipped)
            return (
                f"nothing you could change: the {n} candidate{'s' if n != 1 else ''} left "
                "cannot fold as the model is built (listed by explain(everything=True); CLI "
                "--explain --all)"
            )
        return "\n".join(
            f"{rule}: {where}: {reason}" + (f"  (×{n})" if n > 1 else "")
            for n, rule, where, reason in grouped(mine)
        )

    # ------------------------------------------------------------------ data

    def to_dict(self) -> dict:
        """The report as plain, JSON-able data."""

        def plain(value: object) -> object:
            return asdict(value) if value is not None else None

        return {
            "summary": self.summary(),
            "folded": self.counts(),
            "folds": [asdict(f) for f in self.folded],
            "skipped": [{**asdict(s), "actionable": actionable(s)} for s in self.skipped],
            "before": plain(self.before),
            "after": plain(self.after),
            "verification": plain(self.verification),
            "redrawn_verification": plain(self.redrawn_verification),
            "opaque_modules": dict(self.opaque_modules),
            "notes": list(self.notes),
            "pass_seconds": dict(self.pass_seconds),
        }

    def to_json(self, **kwargs: object) -> str:
        """:meth:`to_dict` as JSON (``kwargs`` go to ``json.dumps``, e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **kwargs)


_SHOWN = 12  # grouped folds listed in the text report
