"""The latency-vs-accuracy plot of report.html: log-scale latency, intervals, labels that never collide.

matplotlib (the ``html`` extra) draws it; ``place_labels`` is a pure function so label
placement can be tested without drawing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

STYLE = {"original": ("s", "#0969da"), "chosen": ("*", "#1a7f37"), "ok": ("o", "#57606a"),
         "rejected": ("X", "#cf222e")}
LEGEND = {"original": "original", "chosen": "chosen", "ok": "within budget", "rejected": "rejected"}

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels (y up)


@dataclass(frozen=True)
class Point:
    label: str
    ms: float  # p50
    drop: float
    role: str  # original | chosen | ok | rejected
    low_ms: float | None = None  # 95% interval of the median
    high_ms: float | None = None


@dataclass(frozen=True)
class Plot:
    svg: str
    xscale: str
    label_boxes: list[Box]  # where the labels were drawn, as the renderer measured them
    marker_boxes: list[Box]


def overlap(a: Box, b: Box) -> float:
    """Area two boxes share (0 when they only touch)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _spots(x: float, y: float, w: float, h: float, gap: float, rings: int):
    """Lower-left corners of places for a w x h label around (x, y), nearest first."""
    for ring in range(rings):
        r = gap + ring * h
        right, left = x + r, x - r - w
        yield from ((right, y - h / 2), (right, y + r / 2), (right, y - r / 2 - h), (x - w / 2, y + r),
                    (x - w / 2, y - r - h), (left, y - h / 2), (left, y + r / 2), (left, y - r / 2 - h))


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], *,
                 obstacles: Sequence[Box] = (), bounds: Box | None = None, gap: float = 7.0,
                 rings: int = 12) -> list[Box]:
    """A box per label near its anchor, overlapping no earlier label and no obstacle where possible.

    Greedy, in the order given (put the labels that matter most first): each label takes the
    nearest free spot on rings around its anchor that stays inside ``bounds``; when every spot
    is taken, the one with the least overlap.
    """
    placed: list[Box] = []
    for (x, y), (w, h) in zip(anchors, sizes, strict=True):
        best, best_cost = None, float("inf")
        for sx, sy in _spots(x, y, w, h, gap, rings):
            box = (sx, sy, sx + w, sy + h)
            cost = sum(overlap(box, o) for o in (*placed, *obstacles))
            if bounds is not None:
                cost += w * h - overlap(box, bounds)  # the part outside the axes
            if cost < best_cost:
                best, best_cost = box, cost
            if cost == 0:
                break
        placed.append(best)
    return placed


# Drawn bottom to top: the original last, so a chosen star at the same point never hides it.
_ORDER = {"rejected": 0, "ok": 1, "chosen": 2, "original": 3}


def _draw_points(ax, points: Sequence[Point]) -> None:
    for role in sorted(STYLE, key=_ORDER.get):
        mine = [p for p in points if p.role == role]
        if not mine:
            continue
        marker, colour = STYLE[role]
        bars = [p for p in mine if p.low_ms is not None and p.high_ms is not None]
        if bars:
            _, _, (lines,) = ax.errorbar(
                [p.ms for p in bars], [p.drop for p in bars], fmt="none", ecolor=colour, elinewidth=1.2, capsize=3,
                xerr=[[max(p.ms - p.low_ms, 0) for p in bars], [max(p.high_ms - p.ms, 0) for p in bars]],
                zorder=2 + _ORDER[role])
            lines.set_gid(f"interval-{role}")
        hollow = role == "original"
        ax.scatter([p.ms for p in mine], [p.drop for p in mine], marker=marker, s={"chosen": 320, "original": 110}
                   .get(role, 60), facecolors="none" if hollow else colour, edgecolors=colour if hollow else "white",
                   linewidths=2.2 if hollow else 0.8, zorder=3 + _ORDER[role], label=LEGEND[role], gid=f"point-{role}")


def _set_axes(ax, points: Sequence[Point], budget: float | None, drop_label: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if budget is not None:
        ax.axhline(budget, color="#bf8700", linestyle="--", linewidth=1, label=f"budget ({budget:g})", zorder=1)
    lows = [min(p.ms, p.low_ms or p.ms) for p in points]
    highs = [max(p.ms, p.high_ms or p.ms) for p in points]
    ax.set_xlim(min(lows) / 1.8, max(highs) * 1.8)  # room for labels on both sides
    drops = [p.drop for p in points] + ([budget] if budget is not None else [])
    pad = max((max(drops) - min(drops)) * 0.25, 0.25)
    ax.set_ylim(min(min(drops), 0) - pad, max(drops) + pad)
    tick = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(tick)
    if max(highs) / min(lows) < 30:  # a decade or so: label minor ticks too
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2, 3, 5)))
        ax.xaxis.set_minor_formatter(tick)
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("p50 latency, ms (log scale; bars: 95% interval of the median) - lower is better")
    ax.set_ylabel(drop_label)
    ax.grid(True, which="major", alpha=.3)
    ax.grid(True, which="minor", alpha=.1)
    rank = [*LEGEND.values()]
    ranked = sorted(zip(*ax.get_legend_handles_labels()), key=lambda hl: rank.index(hl[1]) if hl[1] in rank else 9)
    ax.legend(*zip(*ranked), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)


def _label_points(ax, renderer, points: Sequence[Point]) -> tuple[list, list[Box]]:
    """Annotate every point where ``place_labels`` finds room; (the annotations, the marker boxes)."""
    labelled = sorted(points, key=lambda p: {"chosen": 0, "original": 1}.get(p.role, 2))
    anchors = [tuple(ax.transData.transform((p.ms, p.drop))) for p in labelled]
    radius = [{"chosen": 11, "original": 8}.get(p.role, 6) for p in labelled]
    markers = [(x - r, y - r, x + r, y + r) for (x, y), r in zip(anchors, radius, strict=True)]
    font = [{"fontsize": 9, "fontweight": "bold" if p.role == "chosen" else "normal"} for p in labelled]
    pad = 3  # the browser may set the SVG text in a slightly wider font than the one measured here
    sizes = []
    for p, f in zip(labelled, font, strict=True):
        probe = ax.text(0, 0, p.label, **f)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((extent.width + 2 * pad, extent.height + 2 * pad))
    frame = ax.get_window_extent(renderer)
    boxes = place_labels(anchors, sizes, obstacles=markers, bounds=(frame.x0, frame.y0, frame.x1, frame.y1))
    to_points = 72 / ax.figure.dpi
    texts = []
    for p, f, box, (x, y) in zip(labelled, font, boxes, anchors, strict=True):
        near = box[0] - 14 <= x <= box[2] + 14 and box[1] - 14 <= y <= box[3] + 14
        leader = None if near else {"arrowstyle": "-", "color": STYLE[p.role][1], "linewidth": .7,
                                    "shrinkA": 0, "shrinkB": 6}  # far from its point: a line says whose it is
        texts.append(ax.annotate(p.label, (p.ms, p.drop), ha="left", va="bottom", color=STYLE[p.role][1],
                                 xytext=((box[0] + pad - x) * to_points, (box[1] + pad - y) * to_points),
                                 textcoords="offset points", zorder=8, arrowprops=leader, **f))
    return texts, markers


def draw_plot(points: Sequence[Point], *, budget: float | None, drop_label: str) -> Plot:
    """Latency (log x) against the drop (y); labels placed clear of each other and of the markers."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # measures text; the SVG is saved apart
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.text import Text

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dlopt", "font.size": 10}):
        fig = Figure(figsize=(10, 5))
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_axes((0.08, 0.11, 0.70, 0.84))  # fixed: labels are placed in these pixels
        ax.set_xscale("log")  # one slow candidate (untuned TVM at 100x) must not squash the rest
        _draw_points(ax, points)
        _set_axes(ax, points, budget, drop_label)
        renderer = canvas.get_renderer()
        texts, markers = _label_points(ax, renderer, points)
        canvas.draw()
        # the text's own box, without its leader line, as drawn
        labels = [tuple(float(v) for v in Text.get_window_extent(t, renderer).extents) for t in texts]
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return Plot(svg[svg.index("<svg"):], ax.get_xscale(), labels, [tuple(map(float, m)) for m in markers])


