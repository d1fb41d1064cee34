"""A picture of one folded block, before and after: ``report.draw("fold.svg")``, CLI ``--graph``.

The report keeps a *sketch* of the graph as captured and as folded (``repfx.report.sketch``:
each call's name, what it computes, the module it belongs to, the calls it reads). :func:`draw`
picks one block — by default the module that holds the first fold, widened to its enclosing
module until it holds a handful of ops (a RIFormer block, a RepVGG block) — and draws its ops
in both graphs side by side, layered in topological order: ops the fold removed in red, ops
it created or whose weights it changed in green.

Rendered with matplotlib (pure Python wheels, no system binary: graphviz's ``dot`` is not
installed on many machines, and its Python bindings need it), into any format matplotlib
writes (SVG, PNG, PDF), with the text kept as text in SVG. Install it with
``pip install 'repfx[draw]'``. Layout comes from networkx's topological generations.
"""

from __future__ import annotations

import os
import tempfile
from typing import Protocol

import networkx as nx

from ..errors import Error
from .sketch import GraphSketch, SketchNode, in_module

MIN_BLOCK_OPS = 6  # widen the drawn block to its parent module until it has this many ops
MAX_BLOCK_OPS = 80  # ... but not past this many: the picture would be unreadable
REMOVED, CHANGED, KEPT, OUTSIDE = "#f4a6a6", "#a6e3a6", "#e8e8e8", "#ffffff"


class DrawError(Error, RuntimeError):
    """The picture cannot be drawn (matplotlib missing, nothing folded, an unknown block)."""


class Drawable(Protocol):
    """What :func:`draw` reads of a report: a ``repfx.report.fold_report.FoldReport``, which
    imports this module to draw itself, so this module does not import it back."""

    folded: list  # its Folded records (rule, where, detail)
    before_sketch: GraphSketch | None
    after_sketch: GraphSketch | None


def representative_block(report: Drawable) -> str:
    """The module holding the first fold (other than a removed no-op), widened to its parent
    until it holds :data:`MIN_BLOCK_OPS` ops of the captured graph (not past
    :data:`MAX_BLOCK_OPS`)."""
    sketch = _sketches(report)[0]
    first = next((f for f in report.folded if f.rule != "cleanup"), None)
    if first is None:
        raise DrawError("nothing was folded (other than no-ops): there is no block to draw")
    parts = first.where.split(":")[0].split(".")
    while parts and len(sketch.block(".".join(parts))) < MIN_BLOCK_OPS:
        if len(sketch.block(".".join(parts[:-1]))) > MAX_BLOCK_OPS:
            break
        parts.pop()
    return ".".join(parts)


def draw(report: Drawable, path: str | os.PathLike, block: str | None = None) -> str:
    """Draw ``block`` (a module path; default :func:`representative_block`) before and after
    folding into ``path``, written atomically; returns the block drawn."""
    try:
        from matplotlib import rc_context
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DrawError("drawing needs matplotlib: pip install 'repfx[draw]'") from exc
    before, after = _sketches(report)
    block = representative_block(report) if block is None else block
    old, new = before.block(block), after.block(block)
    if not old:
        raise DrawError(f"no op of the captured graph belongs to module {block!r}")
    if len(old) > MAX_BLOCK_OPS:
        raise DrawError(
            f"{block or 'the model'} has {len(old)} ops, too many to draw readably: name a "
            "smaller module (report.draw(path, block='...'))"
        )
    changed = _changed_paths(report, block)
    kept = {n.name for n in new}
    old_colour = {n.name: KEPT if n.name in kept else REMOVED for n in old}
    names = {n.name for n in old}
    new_colour = {
        n.name: CHANGED if n.name not in names or n.path in changed else KEPT for n in new
    }
    depth = max(_depth(old), _depth(new))
    figure = Figure(figsize=(10, 0.8 * depth + 1.5))
    left, right = figure.subplots(1, 2)
    _draw_side(left, old, old_colour, f"{block or 'model'}: before ({len(old)} ops)", depth)
    _draw_side(right, new, new_colour, f"after ({len(new)} ops)", depth)
    figure.text(0.5, 0.01, "red: removed   green: created, or took a fold", ha="center")
    _save(figure, path, rc_context)
    return block


def _sketches(report: Drawable) -> tuple[GraphSketch, GraphSketch]:
    if report.before_sketch is None or report.after_sketch is None:
        raise DrawError("this report holds no graph sketch (a fold inside untraced modules)")
    return report.before_sketch, report.after_sketch


def _changed_paths(report: Drawable, block: str) -> set[str]:
    """Modules in ``block`` that a fold names as taking something (``into conv a.b``)."""
    words = (word for f in report.folded for word in f.detail.replace(",", " ").split())
    return {w for w in words if "." in w and in_module(w, block)}


def _graph(nodes: list[SketchNode]) -> nx.DiGraph:
    graph = nx.DiGraph()
    inside = {n.name for n in nodes}
    for n in nodes:
        short = n.path.rsplit(".", 1)[-1] if n.is_module else ""
        graph.add_node(n.name, label=f"{n.label}\n{short}" if short else n.label)
        for i in n.inputs:
            if i not in inside:
                graph.add_node(f"in:{i}", label="input")
            graph.add_edge(i if i in inside else f"in:{i}", n.name)
    return graph


def _depth(nodes: list[SketchNode]) -> int:
    return len(list(nx.topological_generations(_graph(nodes)))) if nodes else 1


def _draw_side(
    ax, nodes: list[SketchNode], colours: dict[str, str], title: str, depth: int
) -> None:
    graph = _graph(nodes)
    position = {}
    for level, generation in enumerate(nx.topological_generations(graph)):
        for i, name in enumerate(sorted(generation)):
            position[name] = (i - (len(generation) - 1) / 2, -level)
    for a, b in graph.edges:
        skips = position[a][1] - position[b][1] > 1  # a residual: bend it out of the column
        arrow = {"arrowstyle": "->", "color": "#777777", "shrinkA": 12, "shrinkB": 12,
                 "connectionstyle": f"arc3,rad={0.35 if skips else 0}"}  # fmt: skip
        ax.annotate("", xy=position[b], xytext=position[a], arrowprops=arrow)
    for name, (x, y) in position.items():
        ax.text(
            x, y, graph.nodes[name]["label"], ha="center", va="center", fontsize=8,
            bbox={"boxstyle": "round", "fc": colours.get(name, OUTSIDE), "ec": "#555555"},
        )  # fmt: skip
    xs = [x for x, _ in position.values()] or [0]
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(-depth + 0.3, 0.7)  # one scale for both sides: ops line up by depth
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def _save(figure, path: str | os.PathLike, rc_context) -> None:
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    suffix = os.path.splitext(target)[1] or ".svg"
    fd, temporary = tempfile.mkstemp(prefix=".repfx-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        with rc_context({"svg.fonttype": "none"}):
            figure.savefig(temporary, format=suffix.lstrip(".") or "svg", bbox_inches="tight")
        os.chmod(temporary, 0o644)  # readable as a picture should be (mkstemp makes it 0600)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
