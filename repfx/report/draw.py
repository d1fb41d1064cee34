"""A picture of one folded block, before and after: ``report.draw("fold.svg")``, CLI ``--graph``.

The report keeps a *sketch* of the graph as captured and as folded (``repfx.report.sketch``).
:func:`draw` picks one block, draws its ops in both graphs side by side and writes the picture.

**Which block** (:func:`representative_block`, unless ``block=`` names a module). Each fold other
than a removed no-op happened at a site (its record's ``where``); a site widens to its *block*,
the innermost module around it holding at least :data:`MIN_BLOCK_OPS` drawn ops of the captured
graph (never widened into a module of more than :data:`MAX_BLOCK_OPS`). Of those blocks, the
picture shows one where the fold is visible (an op removed, created or changed), of the most
common kind (paths alike once their indices are wildcarded, ``stages.*.*``: a fold repeated
through the network rather than a one-off stem), the one with the most ops removed, the first
in the graph on a tie. In a RepVGG that is a ``stages.X.Y`` block whose three branches merge
into one conv; in a RIFormer a block whose token mixer and LayerScales fold away.

**What is drawn**: the dataflow of tensors, the ops of the block that compute a tensor from the
model's inputs (:data:`~repfx.report.sketch.TENSOR`), and, in white, the values it reads from
outside. Shape reads and checks (``x.ndim == 4``, ``torch._assert``) and ops on parameters only
are counted, not drawn.

**Counts**: each side's header counts the block's ops as the report counts a graph's ops (every
call but rank guards: ``GraphStats.nodes``), so for the whole model (``block=""``) they are the
report's ``N → M ops``; a note under the header says how many of them are not drawn.

**Colours**: on the left, red the ops the fold removed, grey those it kept; on the right, green
the ops it created or that took a fold (:func:`fold_targets`), grey the others.

**Layout**: an op sits a layer below its deepest input, moved down as far as its readers allow
(a short branch beside the op it joins), ordered in its layer by where its inputs sit. Labels
are measured with the renderer and each box is sized to its label; boxes of a layer share one
height and are spaced apart, so no two overlap. An edge between adjacent layers is a straight
line through the empty band between them; a longer one (a residual) drops into the band below
its source, runs down a lane to the right of every box and enters its target from the band
above it: no edge crosses a box. :func:`layout` returns the figure with the boxes as laid out
(what the tests check); :func:`draw` writes it.

Rendered with matplotlib (pure Python wheels, no system binary: graphviz's ``dot`` is not
installed on many machines, and its Python bindings need it), into any format matplotlib writes
(SVG, PNG, PDF), with the text kept as text in SVG. Install it with ``pip install 'repfx[draw]'``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import Error
from .sketch import CONSTANT, SHAPE, TENSOR, GraphSketch, SketchNode, in_module

MIN_BLOCK_OPS = 6  # widen the drawn block to its parent module until it has this many ops
MAX_BLOCK_OPS = 80  # ... but not past this many: the picture would be unreadable
REMOVED, CHANGED, KEPT, OUTSIDE = "#f4a6a6", "#a6e3a6", "#e8e8e8", "#ffffff"
LEGEND = (
    (REMOVED, "removed"), (CHANGED, "created / took a fold"), (KEPT, "kept"),
    (OUTSIDE, "from outside the block"),
)  # fmt: skip
INPUT = "input:"  # the name of a box standing for a value read from outside the block

# Sizes, in inches (labels in points)
FONT_SIZE = 8
PAD_X, PAD_Y = 0.08, 0.05  # around a label, inside its box
BOX_GAP = 0.22  # between two boxes of a layer
BAND = 0.42  # between two layers: where the edges run
LANE_GAP = 0.14  # between the lanes of long edges, right of the boxes
SIDE_GAP = 0.7  # between the two sides
MARGIN = 0.25
EDGE = {"arrowstyle": "-|>", "mutation_scale": 9, "color": "#666666", "lw": 0.9,
        "shrinkA": 0, "shrinkB": 0}  # fmt: skip


class DrawError(Error, RuntimeError):
    """The picture cannot be drawn (matplotlib missing, nothing folded, an unknown block)."""


class Drawable(Protocol):
    """What :func:`draw` reads of a report: a ``repfx.report.fold_report.FoldReport``, which
    imports this module to draw itself, so this module does not import it back."""

    folded: list  # its Folded records (rule, where, detail)
    before_sketch: GraphSketch | None
    after_sketch: GraphSketch | None


@dataclass(frozen=True)
class Box:
    """One box of the picture as laid out."""

    side: str  # "before" or "after"
    name: str  # the op's node name; INPUT + name for a value read from outside the block
    label: str
    colour: str
    bbox: Any  # the box, a matplotlib Bbox in display coordinates (pixels)
    text: Any  # its label's extent, likewise


@dataclass(frozen=True)
class Picture:
    """A laid-out picture: the figure, its boxes, and what its headers say."""

    figure: Any  # a matplotlib Figure
    block: str
    boxes: list[Box]
    ops: dict[str, int]  # side -> the block's ops, counted as the report counts a graph's
    headers: dict[str, str]  # side -> its header: "before: 19 ops", then what is not drawn
    furniture: dict[str, Any]  # "title", "header:before", "header:after", "legend" -> its Bbox


# --------------------------------------------------------------------------- which block


def representative_block(report: Drawable) -> str:
    """The block a picture shows by default: see the module docstring."""
    before, after = _sketches(report)
    sites = [_site(f.where) for f in report.folded if f.rule != "cleanup"]
    if not sites:
        raise DrawError("nothing was folded (other than no-ops): there is no block to draw")
    drawn = _ops_per_module(n for n in before.nodes if n.computes == TENSOR)
    blocks = list(dict.fromkeys(_widen(drawn, site) for site in sites))
    kinds = Counter(_kind_of_block(b) for b in blocks)
    ops_before, ops_after = _ops_per_module(before.nodes), _ops_per_module(after.nodes)
    targets = fold_targets(report)
    first = {b: _first_index(before, b) for b in blocks}

    def rank(b: str) -> tuple:
        visible = _shows_a_fold(before, after, b, targets)
        return visible, kinds[_kind_of_block(b)], ops_before[b] - ops_after[b], -first[b]

    return max(blocks, key=rank)


def _site(where: str) -> str:
    """The module of a fold's site (``where``: ``a.b`` or ``a.b:mul_1``; a bare node name when
    the op is at the top level, which :func:`_widen` trims away)."""
    return where.split(":")[0]


def _ops_per_module(nodes) -> Counter[str]:
    """How many of ``nodes`` each module holds, its submodules' included (``""``: all)."""
    counts: Counter[str] = Counter()
    for n in nodes:
        parts = n.path.split(".") if n.path else []
        counts.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    return counts


def _widen(drawn: Counter[str], site: str) -> str:
    """The block of a fold's site: its innermost module holding an op, widened to its parent
    until it holds :data:`MIN_BLOCK_OPS` drawn ops, not into one of over :data:`MAX_BLOCK_OPS`."""
    parts = site.split(".") if site else []
    while parts and not drawn[".".join(parts)]:  # a top-level node's name; inside a leaf module
        parts.pop()
    while parts and drawn[".".join(parts)] < MIN_BLOCK_OPS:
        if drawn[".".join(parts[:-1])] > MAX_BLOCK_OPS:
            break
        parts.pop()
    return ".".join(parts)


def _kind_of_block(path: str) -> str:
    """``path`` with its indices wildcarded: ``stages.2.1`` → ``stages.*.*``."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _first_index(sketch: GraphSketch, block: str) -> int:
    return next((i for i, n in enumerate(sketch.nodes) if in_module(n.path, block)), -1)


def _shows_a_fold(before: GraphSketch, after: GraphSketch, block: str, targets: set[str]) -> bool:
    old, new = before.block(block), after.block(block)
    colours = [*_before_colours(old, new).values(), *_after_colours(old, new, targets).values()]
    return any(c != KEPT for c in colours)


# --------------------------------------------------------------------------- colours


def fold_targets(report: Drawable) -> set[str]:
    """Where the folds went: the op locations (``repfx.ir.graph.where``: a module path, or
    ``path:node``) the fold records name as taking a fold.

    A record says where its fold went after ``into`` or ``input of``, as a list of ``<kind>
    <location>`` (``into conv a.b``; ``into the input of linear a.q, linear a.k``; ``undone in
    the input of conv a.c``), the list ending at ``through`` (``folded into linear a.fc through
    the flatten``); ``;`` separates the steps of one fold, a parenthesised aside lists what it
    went through, and ``into one <kind>`` names the kind of an op it created (green as created
    anyway), not a place. Records that name no place (``removed no-op``) add nothing."""
    targets = set()
    for f in report.folded:
        for step in re.sub(r"\([^)]*\)", " ", f.detail).split(";"):
            *said, places = re.split(r"\binto\b|\binput of\b", step)
            for place in places.split(" through ")[0].split(",") if said else []:
                words = place.split()
                if words and words[-2:-1] != ["one"]:
                    targets.add(words[-1])
    return targets


def _before_colours(old: list[SketchNode], new: list[SketchNode]) -> dict[str, str]:
    kept = {n.name for n in new}
    return {n.name: KEPT if n.name in kept else REMOVED for n in old if n.computes == TENSOR}


def _after_colours(
    old: list[SketchNode], new: list[SketchNode], targets: set[str]
) -> dict[str, str]:
    existed = {n.name for n in old}
    return {
        n.name: CHANGED if n.name not in existed or n.location in targets else KEPT
        for n in new
        if n.computes == TENSOR
    }


# --------------------------------------------------------------------------- drawing


def draw(report: Drawable, path: str | os.PathLike, block: str | None = None) -> str:
    """Draw ``block`` (a module path; default :func:`representative_block`) before and after
    folding into ``path``, written atomically; returns the block drawn."""
    picture = layout(report, block)
    _save(picture.figure, path)
    return picture.block


def layout(report: Drawable, block: str | None = None) -> Picture:
    """The picture of ``block`` (default :func:`representative_block`), laid out."""
    figure_class, canvas_class = _matplotlib()
    before, after = _sketches(report)
    block = representative_block(report) if block is None else block
    old, new = before.block(block), after.block(block)
    drawn = sum(n.computes == TENSOR for n in old)
    if not drawn:
        raise DrawError(f"no op of the captured graph belongs to module {block!r}")
    if drawn > MAX_BLOCK_OPS:
        raise DrawError(
            f"{block or 'the model'} has {drawn} ops, too many to draw readably: name a "
            "smaller module (report.draw(path, block='...'))"
        )
    sides = [
        _Side.of("before", before, block, _before_colours(old, new)),
        _Side.of("after", after, block, _after_colours(old, new, fold_targets(report))),
    ]
    figure = figure_class(dpi=100)
    return _Canvas(figure, canvas_class(figure), block, sides).lay_out()


def _matplotlib() -> tuple[type, type]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DrawError("drawing needs matplotlib: pip install 'repfx[draw]'") from exc
    return Figure, FigureCanvasAgg


def _sketches(report: Drawable) -> tuple[GraphSketch, GraphSketch]:
    if report.before_sketch is None or report.after_sketch is None:
        raise DrawError("this report holds no graph sketch (a fold inside untraced modules)")
    return report.before_sketch, report.after_sketch


@dataclass
class _Side:
    """One side of the picture: the block's ops in one graph, as boxes in layers."""

    name: str
    ops: list[SketchNode]  # all of the block's ops, as counted
    labels: dict[str, str]  # the boxes: drawn op (or INPUT + value) -> label
    colours: dict[str, str]
    edges: list[tuple[str, str]]
    layers: list[list[str]]
    layer_of: dict[str, int]

    @staticmethod
    def of(name: str, sketch: GraphSketch, block: str, colours: dict[str, str]) -> _Side:
        ops = sketch.block(block)
        drawn = [n for n in ops if n.computes == TENSOR]
        everything = {n.name: n for n in sketch.nodes}
        labels = {n.name: _label(n, block) for n in drawn}
        edges, order = [], {n.name: float(i) for i, n in enumerate(drawn)}
        for i, n in enumerate(drawn):
            for value in dict.fromkeys(n.inputs):
                source = everything.get(value)
                if value in labels:
                    edges.append((value, n.name))
                elif source is None or source.computes == TENSOR:  # a graph input, or an op
                    labels.setdefault(INPUT + value, _input_label(value, source))
                    order.setdefault(INPUT + value, i - 0.5)
                    edges.append((INPUT + value, n.name))
        colours = {**dict.fromkeys(labels, OUTSIDE), **colours}
        layers = _layers(order, edges)
        layer_of = {box: i for i, layer in enumerate(layers) for box in layer}
        return _Side(name, ops, labels, colours, edges, layers, layer_of)

    def header(self) -> str:
        """``before: 19 ops``, and under it the ops counted but not drawn."""
        hidden = Counter(n.computes for n in self.ops)
        notes = [
            f"{hidden[kind]} {words}"
            for kind, words in ((SHAPE, "shape reads / checks"), (CONSTANT, "on parameters only"))
            if hidden[kind]
        ]
        note = f"not drawn: {', '.join(notes)}" if notes else "all drawn" if self.ops else "none"
        return f"{self.name}: {len(self.ops)} op{'s' if len(self.ops) != 1 else ''}\n{note}"


def _label(node: SketchNode, block: str) -> str:
    """What the op computes, and (for a module, or an op inside a submodule of the block) where."""
    what = node.description or node.label
    where = node.path[len(block) + 1 :] if block and node.path != block else node.path
    if node.path == block:
        where = node.path.rsplit(".", 1)[-1] if node.is_module else ""
    return f"{what}\n{_short(where)}" if where else what


def _input_label(value: str, source: SketchNode | None) -> str:
    if source is None:
        return f"model input\n{value}"
    return f"from {_short(source.path or source.location)}"


def _short(path: str, most: int = 26) -> str:
    """``path``, or its last two parts when it is long."""
    return path if len(path) <= most else "…" + ".".join(path.split(".")[-2:])[-most:]


def _layers(order: dict[str, float], edges: list[tuple[str, str]]) -> list[list[str]]:
    """Boxes in layers (:func:`_levels`), each layer ordered by where its boxes' inputs sit in
    the layer above (an input from further up comes down the lane on the right)."""
    level = _levels(order, edges)
    low = min(level.values(), default=0)
    layers: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) - low + 1)]
    for name in sorted(order, key=lambda n: (level[n], order[n])):
        layers[level[name] - low].append(name)
    inputs: dict[str, list[str]] = {name: [] for name in order}
    for a, b in edges:
        inputs[b].append(a)
    position: dict[str, float] = {}
    for layer in layers:
        seen = {n: [position.get(a, 1.5) for a in inputs[n]] for n in layer}
        layer.sort(key=lambda n: (_mean(seen[n]), order[n]))
        position = {n: (i + 0.5) / len(layer) for i, n in enumerate(layer)}
    return layers


def _levels(order: dict[str, float], edges: list[tuple[str, str]]) -> dict[str, int]:
    """An op one below its deepest input, then moved down as far as its readers allow (a short
    branch sits by the op it joins; the long edge is the one from the fork); a value from
    outside one above its first reader."""
    ops = [name for name in sorted(order, key=order.get) if not name.startswith(INPUT)]
    level: dict[str, int] = {}
    for name in ops:
        level[name] = 1 + max((level[a] for a, b in edges if b == name and a in level), default=0)
    for name in reversed(ops):
        readers = [level[b] for a, b in edges if a == name]
        level[name] = min(readers) - 1 if readers else level[name]
    for a, b in edges:
        if a.startswith(INPUT):
            level[a] = min(level.get(a, level[b] - 1), level[b] - 1)
    return level


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else -1.0


def _lanes(side: _Side) -> dict[tuple[str, str], int]:
    """A lane for each edge that skips a layer, edges whose runs down overlap in different
    lanes: shorter edges nearer the boxes (a residual nested in another runs inside it), and
    of alike ones, the one to the leftmost target (which :meth:`_Canvas._edges` makes the
    outer ones wrap around the inner ones)."""
    spans = {
        (a, b): (side.layer_of[a], side.layer_of[b])
        for a, b in side.edges
        if side.layer_of[b] > side.layer_of[a] + 1
    }
    taken: list[list[tuple[int, int]]] = []  # the spans each lane holds
    lanes = {}
    for edge, (top, bottom) in sorted(
        spans.items(), key=lambda e: (e[1][1] - e[1][0], side.layers[e[1][1]].index(e[0][1]))
    ):
        apart = (i for i, held in enumerate(taken) if all(b <= top or bottom <= a for a, b in held))
        lanes[edge] = next(apart, len(taken))
        if lanes[edge] == len(taken):
            taken.append([])
        taken[lanes[edge]].append((top, bottom))
    return lanes


# --------------------------------------------------------------------------- geometry


class _Canvas:
    """Lays out the sides on one axes whose data unit is an inch, top down: the title, each
    side's header, the layers of boxes, the legend. Every label is measured first."""

    def __init__(self, figure, canvas, block: str, sides: list[_Side]):
        from matplotlib.patches import Patch

        self.figure, self.canvas, self.block, self.sides = figure, canvas, block, sides
        self.ax = figure.add_axes((0, 0, 1, 1))
        self.ax.axis("off")
        text = self.ax.text
        self.texts = {
            (side.name, box): text(0, 0, label, ha="center", va="center", fontsize=FONT_SIZE)
            for side in sides
            for box, label in side.labels.items()
        }
        title = f"{block or 'the whole model'}, before and after folding"
        self.furniture = {"title": text(0, 0, title, ha="center", va="top", fontsize=11)}
        for side in sides:
            header = text(0, 0, side.header(), ha="center", va="top", fontsize=9)
            self.furniture[f"header:{side.name}"] = header
        handles = [Patch(facecolor=c, edgecolor="#555555", label=words) for c, words in LEGEND]
        self.furniture["legend"] = self.ax.legend(
            handles=handles, loc="lower center", ncol=len(handles), frameon=False,
            fontsize=FONT_SIZE, handlelength=1.5, columnspacing=1.5,
        )  # fmt: skip
        artists = {**self.texts, **self.furniture}
        self.size = {key: self._inches(artist) for key, artist in artists.items()}

    def _inches(self, artist) -> tuple[float, float]:
        extent = artist.get_window_extent(self.canvas.get_renderer())
        return extent.width / self.figure.dpi, extent.height / self.figure.dpi

    def lay_out(self) -> Picture:
        depth = max(len(side.layers) for side in self.sides)
        heights = [self._layer_height(i) for i in range(depth)]
        contents = [self._content_width(side) for side in self.sides]
        lanes = [_lanes(side) for side in self.sides]
        columns = [
            max(w + LANE_GAP * (1 + max(ls.values(), default=-1)), self.size[f"header:{s.name}"][0])
            for w, ls, s in zip(contents, lanes, self.sides, strict=True)
        ]
        headed = MARGIN + self.size["title"][1] + self._header_height() + BAND / 2
        width = 2 * MARGIN + max(
            sum(columns) + SIDE_GAP, self.size["title"][0], self.size["legend"][0]
        )
        height = headed + sum(heights) + BAND * depth + self.size["legend"][1] + MARGIN
        self.figure.set_size_inches(width, height)
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(0, height)
        tops = [height - headed - sum(heights[:i]) - BAND * i for i in range(depth)]
        x0 = (width - sum(columns) - SIDE_GAP) / 2
        patches = {}
        for side, content, column, side_lanes in zip(
            self.sides, contents, columns, lanes, strict=True
        ):
            places = self._place(side, x0, content, tops, heights)
            patches.update(self._boxes(side, places))
            self._edges(side, places, side_lanes, x0 + content)
            top = height - MARGIN - self.size["title"][1] - BAND / 4
            self.furniture[f"header:{side.name}"].set_position((x0 + column / 2, top))
            x0 += column + SIDE_GAP
        self.furniture["title"].set_position((width / 2, height - MARGIN))
        self.furniture["legend"].set_bbox_to_anchor((width / 2, MARGIN), self.ax.transData)
        return self._picture(patches)

    def _layer_height(self, i: int) -> float:
        heights = [
            self.size[(side.name, box)][1]
            for side in self.sides
            if i < len(side.layers)
            for box in side.layers[i]
        ]
        return max(heights, default=0.0) + 2 * PAD_Y

    def _box_width(self, side: _Side, box: str) -> float:
        return self.size[(side.name, box)][0] + 2 * PAD_X

    def _content_width(self, side: _Side) -> float:
        return max(
            (sum(self._box_width(side, b) for b in layer) + BOX_GAP * (len(layer) - 1)
             for layer in side.layers),
            default=0.0,
        )  # fmt: skip

    def _header_height(self) -> float:
        return max(self.size[f"header:{side.name}"][1] for side in self.sides)

    def _place(self, side: _Side, x0: float, content: float, tops: list, heights: list) -> dict:
        """Each box's (left, bottom, width, height), its layer centred in the side's content."""
        places = {}
        for i, layer in enumerate(side.layers):
            widths = [self._box_width(side, b) for b in layer]
            x = x0 + (content - sum(widths) - BOX_GAP * (len(layer) - 1)) / 2
            for box, w in zip(layer, widths, strict=True):
                places[box] = (x, tops[i] - heights[i], w, heights[i])
                x += w + BOX_GAP
        return places

    def _boxes(self, side: _Side, places: dict) -> dict:
        from matplotlib.patches import FancyBboxPatch

        patches = {}
        for box, (x, y, w, h) in places.items():
            patch = FancyBboxPatch(
                (x, y), w, h, boxstyle="round,pad=0,rounding_size=0.05",
                facecolor=side.colours[box], edgecolor="#555555", lw=0.8,
            )  # fmt: skip
            self.ax.add_patch(patch)
            self.texts[(side.name, box)].set_position((x + w / 2, y + h / 2))
            patches[(side.name, box)] = (patch, side.colours[box])
        return patches

    def _edges(self, side: _Side, places: dict, lanes: dict, right: float) -> None:
        """A straight line between adjacent layers, through the band between them; a longer
        edge by its lane, right of the boxes, entering and leaving through the bands, an outer
        lane's nearer the boxes than an inner one's (so that it wraps around it)."""
        from matplotlib.patches import FancyArrowPatch
        from matplotlib.path import Path

        count = len(set(lanes.values()))
        for a, b in side.edges:
            (xa, ya, wa, _), (xb, yb, wb, hb) = places[a], places[b]
            if (a, b) not in lanes:
                arrow = FancyArrowPatch((xa + wa / 2, ya), (xb + wb / 2, yb + hb), **EDGE)
            else:
                share = (count - lanes[(a, b)]) / (count + 1)  # of the band, from the boxes
                lane = right + LANE_GAP * (lanes[(a, b)] + 1)
                start, end = xa + wa * 0.75, xb + wb * 0.75
                out, into = ya - BAND * share, yb + hb + BAND * share
                route = [(start, ya), (start, out), (lane, out), (lane, into), (end, into)]
                arrow = FancyArrowPatch(path=Path([*route, (end, yb + hb)]), **EDGE)
            self.ax.add_patch(arrow)

    def _picture(self, patches: dict) -> Picture:
        renderer = self.canvas.get_renderer()
        boxes = [
            Box(
                side,
                box,
                text.get_text(),
                colour,
                patch.get_window_extent(renderer),
                text.get_window_extent(renderer),
            )
            for (side, box), (patch, colour) in patches.items()
            for text in [self.texts[(side, box)]]
        ]
        ops = {side.name: len(side.ops) for side in self.sides}
        headers = {side.name: side.header() for side in self.sides}
        extents = {key: a.get_window_extent(renderer) for key, a in self.furniture.items()}
        return Picture(self.figure, self.block, boxes, ops, headers, extents)


def _save(figure, path: str | os.PathLike) -> None:
    from matplotlib import rc_context

    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    suffix = os.path.splitext(target)[1] or ".svg"
    fd, temporary = tempfile.mkstemp(prefix=".repfx-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        with rc_context({"svg.fonttype": "none"}):
            figure.savefig(
                temporary, format=suffix.lstrip(".") or "svg", bbox_inches="tight", dpi=150
            )
        os.chmod(temporary, 0o644)  # readable as a picture should be (mkstemp makes it 0600)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
