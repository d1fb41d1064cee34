"""What a fold did, and why it did not do more.

A :class:`FoldReport` is attached to every folded model as ``folded.meta["repfx_report"]``.
Passes produce :class:`Folded` and :class:`Skipped` records and return them; nothing here is
global state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn


@dataclass(frozen=True)
class Folded:
    rule: str
    where: str
    detail: str


@dataclass(frozen=True)
class Skipped:
    rule: str
    where: str
    reason: str


@dataclass(frozen=True)
class Verification:
    max_abs_error: float
    max_rel_error: float  # max |folded − original| / max |original|, over all outputs
    tolerance: float
    passed: bool
    # Set when the first comparison missed ``tolerance`` and repfx re-checked in float64:
    # the float64 fold's error, and the original's / the fold's errors against float64 truth.
    exact_rel_error: float | None = None
    original_rounding: float | None = None
    folded_rounding: float | None = None
    weight_rounding: float | None = None  # the folded weights evaluated in float64


@dataclass(frozen=True)
class GraphStats:
    parameters: int  # numel of parameters
    buffers: int  # numel of buffers
    nodes: int  # compute nodes (calls), excluding placeholders, attributes and output
    ops: dict[str, int]  # count of recognised op kinds, see repfx.ops.op_kind

    @staticmethod
    def of(gm: fx.GraphModule, module: nn.Module | None = None) -> GraphStats:
        from .inspect import op_counts  # local: inspect depends on ops, which depends on graph

        module = gm if module is None else module
        calls = [n for n in gm.graph.nodes if n.op.startswith("call_")]
        return GraphStats(
            parameters=sum(p.numel() for p in module.parameters()),
            buffers=sum(b.numel() for b in module.buffers()),
            nodes=len(calls),
            ops=dict(op_counts(gm)),
        )


@dataclass
class FoldReport:
    folded: list[Folded] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    before: GraphStats | None = None
    after: GraphStats | None = None
    verification: Verification | None = None
    opaque_modules: dict[str, str] = field(default_factory=dict)  # path -> why not traced
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of folds per rule."""
        return dict(Counter(f.rule for f in self.folded))

    def skip_reasons(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))

    def __str__(self) -> str:
        lines = ["repfx fold report"]
        if self.before and self.after:
            b, a = self.before, self.after
            lines.append(f"  parameters  {b.parameters:,} -> {a.parameters:,}")
            lines.append(f"  buffers     {b.buffers:,} -> {a.buffers:,}")
            lines.append(f"  graph nodes {b.nodes:,} -> {a.nodes:,}")
            for kind in sorted(set(b.ops) | set(a.ops)):
                lines.append(f"    {kind:<14} {b.ops.get(kind, 0):>5} -> {a.ops.get(kind, 0)}")
        lines.append("  folded:" if self.folded else "  folded: nothing")
        for rule, count in sorted(self.counts().items()):
            lines.append(f"    {rule:<22} {count}")
        if self.skipped:
            lines.append("  not folded:")
            for reason, count in sorted(self.skip_reasons().items(), key=lambda kv: -kv[1]):
                lines.append(f"    {count:>4} × {reason}")
        for path, why in self.opaque_modules.items():
            lines.append(f"  traced as a leaf: {path} ({why})")
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.verification:
            v = self.verification
            verdict = "ok" if v.passed else "FAILED"
            lines.append(
                f"  verification {verdict}: max abs {v.max_abs_error:.3g}, "
                f"max rel {v.max_rel_error:.3g} (tolerance {v.tolerance:.1g})"
            )
            if v.exact_rel_error is not None:
                lines.append(
                    f"    float64 re-check: fold error {v.exact_rel_error:.3g}; against float64 "
                    f"truth the original is off by {v.original_rounding:.3g}, the fold by "
                    f"{v.folded_rounding:.3g}, its rounded weights alone by "
                    f"{v.weight_rounding:.3g}"
                )
        return "\n".join(lines)

    def explain(self) -> str:
        """Every candidate that was not folded, with its location and reason."""
        return "\n".join(f"{s.rule}: {s.where}: {s.reason}" for s in self.skipped)
