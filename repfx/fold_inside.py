"""Folding inside a module that runs opaque.

A module no front end captured (a submodule ``torch.fx`` cannot trace, or the whole model when
neither front end can) runs in the folded graph as it is, a black box. repfx folds what is
inside it instead and replaces a child by its folded ``GraphModule`` only where that cannot
change what the opaque module computes:

* **Only called.** When the parent's code reaches the child only by calling it
  (:func:`repfx.capture.child_reason`, read from the bytecode of its methods), a module that
  computes the same function leaves the parent computing the same function: the child is
  replaced, and its own fold's proofs are all there is to prove.
* **Read as a value**: an ``nn.ModuleList`` the parent iterates over, ``self.blocks[i](x)``,
  ``m.f`` read on each element (ultralytics' ``C2f``, ``Detect`` and model loop). Such a child
  is *kept*, the same object of the same type with the same attributes, and repfx tries to
  replace each of *its* children, whole, instead. The parent's code may still tell those
  replacements apart (read ``m.f`` on a replaced element, a weight inside it, test its type),
  so they are proven before any is made: the parent, its parameters and buffers converted to
  float64, runs on the inputs it received on the example inputs (and on others of the same
  shapes, below) once as it is and once with the replacements (each folded from its float64
  copy), and every output must agree as
  :func:`repfx.proof.verify.verify` judges a float64 fold. When they do not agree together, each is
  proven on its own and those that pass are proven together again. A child refused is kept in
  turn and its own children are tried the same way, down to modules without children (a lone
  conv or BatchNorm gains nothing from being folded on its own), which are kept with the
  reason in the report. Without example inputs there is nothing to run the parent on: nothing
  under a kept child is replaced.

  The check is a run, so it sees the paths the parent's code takes on the inputs it runs on:
  the example inputs, their negation and inputs re-drawn at three times their scale
  (:func:`probe_inputs`; the report says which the parent ran on). Code that reads inside a
  replaced module only on inputs none of these reach is beyond it.

Never replaced, nor gone into: a module shared with another call site or reachable under
another name, and a kept child that code outside the parent may reach
(:func:`repfx.capture.descent_reason`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .capture import (
    CaptureError,
    child_reason,
    descent_reason,
    has_own_forward,
    record_inputs,
)
from .errors import one_line
from .ir.match import Fail
from .proof.inputs import copy_model, run
from .proof.verify import float64_inputs, verify
from .report.fold_report import FoldReport, Skipped

# fold a child (a copy it may mutate): (module, the inputs it received or None, report, where
# its folds are reported) → its folded GraphModule; raises CaptureError when it cannot
FoldChild = Callable[[nn.Module, "tuple | None", FoldReport, str], fx.GraphModule]


@dataclass
class OpaqueModule:
    """An opaque module to fold inside, and what folding inside it needs."""

    module: nn.Module
    inputs: tuple | None  # what it received on the example inputs (None: unknown)
    child_inputs: dict[str, tuple | None]  # child name → what it received
    where: str  # its path in the report, with a trailing dot ("" for the model itself)
    shared: Callable[[nn.Module], bool]  # is a module used at more than one place?


def fold_inside(opaque: OpaqueModule, fold_child: FoldChild, report: FoldReport) -> None:
    """Replace the children of ``opaque.module`` that may be replaced by their folds, and
    modules further down in place of those that may not (see the module docstring); what is
    not replaced goes to ``report`` with its reason."""
    candidates = []
    for name, child in list(opaque.module.named_children()):
        where = opaque.where + name
        if opaque.shared(child):
            report.skipped.append(Skipped("capture", where, "module is shared"))
        elif (reason := child_reason(opaque.module, name)) is None:
            _replace(opaque.module, name, fold_child, opaque.child_inputs.get(name), report, where)
        else:
            candidates += _keep(opaque, name, f"untraced parent: {reason.reason}", report)
    while candidates:
        candidates = _replace_proven(opaque, candidates, fold_child, report)


def _replace(
    parent: nn.Module,
    name: str,
    fold_child: FoldChild,
    inputs: tuple | None,
    report: FoldReport,
    where: str,
) -> None:
    """Replace ``parent.<name>`` by its fold (a path may be dotted), or say why it cannot be."""
    holder, attr = _holder(parent, name)
    try:
        folded = fold_child(getattr(holder, attr), inputs, report, where)
    except CaptureError as exc:
        report.skipped.append(Skipped("capture", where, _capture_reason(exc)))
        return
    setattr(holder, attr, folded)


def _holder(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the submodule at the dotted ``path`` of ``root``, and its name there."""
    holder_path, _, name = path.rpartition(".")
    return root.get_submodule(holder_path), name


def _capture_reason(exc: CaptureError) -> str:
    """A capture error's reason, without its advice in parentheses."""
    return str(exc).split(" (")[0]


# ------------------------------------------------------------------- under a kept child


def _keep(opaque: OpaqueModule, path: str, reason: str, report: FoldReport) -> list[str]:
    """Keep the module at ``path`` (in the opaque module) as it is, for ``reason``; the paths
    of its children to try replacing instead (those with children of their own)."""
    kept = opaque.module.get_submodule(path)
    why_not = descent_reason(*_holder(opaque.module, path))
    if opaque.inputs is None:
        why_not = Fail(
            "replacing what is inside it is checked by running its untraced parent, which "
            "needs example inputs (repfx.fold(model, inputs))"
        )
    if why_not is not None or not any(True for _ in kept.children()):
        because = reason if why_not is None else f"{reason}; {why_not.reason}"
        if _has_state(kept):
            report.skipped.append(Skipped("capture", opaque.where + path, f"kept: {because}"))
        return []
    tried = []
    for child_name, child in kept.named_children():
        sub = f"{path}.{child_name}"
        if opaque.shared(child):
            report.skipped.append(Skipped("capture", opaque.where + sub, "module is shared"))
        elif not has_own_forward(child):  # a ModuleList / ModuleDict
            tried += _keep(opaque, sub, f"an element of {path} ({reason})", report)
        elif any(True for _ in child.children()):
            tried.append(sub)
        elif _has_state(child):
            inside = f"kept, inside {path} ({reason})"
            report.skipped.append(Skipped("capture", opaque.where + sub, inside))
    return tried


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


# when replacements under kept children fail their proof together, each is proven on its own
# (when there are at most this many) and those that pass are proven together again
MAX_SINGLE_PROOFS = 32


@dataclass
class _Proof:
    """A float64 run of the opaque module with modules inside it replaced by their folds."""

    refusal: str | None = None  # why none may be replaced
    proven: dict[str, tuple | None] = field(default_factory=dict)  # path → its inputs
    covered: list[str] = field(default_factory=list)  # the inputs it was proven on
    unfolded: dict[str, str] = field(default_factory=dict)  # path → why it did not fold


def _replace_proven(
    opaque: OpaqueModule, paths: list[str], fold_child: FoldChild, report: FoldReport
) -> list[str]:
    """Replace the modules at ``paths`` by their folds where a float64 run of the opaque module
    shows that together they change nothing; keep the others, and return the paths of their
    children to try next."""
    proof, refused = _narrowed(opaque, paths, fold_child)
    tried_next = []
    for path in paths:
        where = opaque.where + path
        if path in refused:
            tried_next += _keep(opaque, path, refused[path], report)
        elif path in proof.proven:
            _replace(opaque.module, path, fold_child, proof.proven[path], report, where)
        else:  # it does not fold whole
            tried_next += _keep(opaque, path, proof.unfolded[path], report)
    replaced = [opaque.where + p for p in paths if p not in refused and p in proof.proven]
    if replaced:
        report.notes.append(
            f"{', '.join(replaced)} replaced by its fold inside untraced code, proven on "
            f"{', '.join(proof.covered)}"
        )
    return tried_next


def _narrowed(
    opaque: OpaqueModule, paths: list[str], fold_child: FoldChild
) -> tuple[_Proof, dict[str, str]]:
    """The proof of the largest set of ``paths`` found to change nothing together (all of
    them, or those that pass on their own), and the refused paths with their reasons."""
    assert opaque.inputs is not None  # (_keep tries nothing without them)
    received = record_inputs(opaque.module, opaque.inputs, paths)
    proof = _prove(opaque, paths, received, fold_child)
    if proof.refusal is None:
        return proof, {}
    refused = dict.fromkeys(paths, proof.refusal)
    if len(paths) == 1 or len(paths) > MAX_SINGLE_PROOFS:
        return proof, refused
    alone = {path: _prove(opaque, [path], received, fold_child) for path in paths}
    passing = [path for path, single in alone.items() if single.refusal is None]
    if not passing or len(passing) == len(paths):  # (all of them together failed above)
        return proof, refused
    if len(passing) == 1:
        together = alone[passing[0]]
    else:
        together = _prove(opaque, passing, received, fold_child)
    if together.refusal is not None:
        return proof, refused
    return together, {path: single.refusal for path, single in alone.items() if single.refusal}


def _prove(
    opaque: OpaqueModule,
    paths: list[str],
    received: dict[str, tuple | None],
    fold_child: FoldChild,
) -> _Proof:
    """Run the opaque module in float64 with and without the modules at ``paths`` replaced by
    their float64 folds (those that fold; ``received``: the inputs each was called with), on
    the inputs it received; compare the outputs."""
    try:
        original = copy_model(opaque.module).double()
        replaced = copy_model(original)
        proof = _Proof()
        for path in paths:
            inputs = received.get(path)
            holder, attr = _holder(replaced, path)
            try:
                inputs64 = None if inputs is None else float64_inputs(inputs)
                folded = fold_child(getattr(holder, attr), inputs64, FoldReport(), path)
            except CaptureError as exc:
                proof.unfolded[path] = _capture_reason(exc)
                continue
            setattr(holder, attr, folded)
            proof.proven[path] = inputs
    except Exception as exc:
        return _Proof(f"the untraced parent fails with this module folded ({one_line(exc)})")
    for label, inputs in probe_inputs(opaque.inputs):
        try:
            run(original, inputs)
        except Exception:  # the parent itself does not run on these: nothing to compare
            continue
        try:
            check = verify(original, replaced, inputs)
        except Exception as exc:  # the parent fails with them replaced: it reads inside them
            return _Proof(
                f"the untraced parent fails with this module folded, on {label} ({one_line(exc)})"
            )
        if not check.passed:
            return _Proof(
                "the untraced parent computes something else with this module folded (it "
                f"reads inside it), on {label}: {check.summary()}"
            )
        proof.covered.append(label)
    return proof


def probe_inputs(inputs: tuple) -> list[tuple[str, tuple]]:
    """The inputs a replacement inside an opaque module is proven on, in float64, each with
    what to call it: the example inputs, their negation, and inputs re-drawn at three times
    their scale (seeded) — so that a branch the example inputs do not take (``if x.mean() >
    0``) is taken too. Integer and boolean tensors (token ids, masks) stay as given."""
    example = float64_inputs(inputs)
    generator = torch.Generator().manual_seed(0)

    def redrawn(x: torch.Tensor) -> torch.Tensor:
        scale = 3 * float(x.abs().max()) if x.numel() else 1.0
        return torch.randn(x.shape, generator=generator, dtype=x.dtype) * (scale or 1.0)

    def each(change: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
        return tree_map(lambda x: change(x) if _floating(x) else x, example)

    return [
        ("the example inputs", example),
        ("their negation", each(torch.neg)),
        ("inputs re-drawn at 3× their scale", each(redrawn)),
    ]


def _floating(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
