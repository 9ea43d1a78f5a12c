"""report.json as one self-contained HTML page: summary, timing, tables and a latency/accuracy plot.

The page has no scripts and no external assets (inline CSS, the plot as inline
SVG), so it can be attached to a CI run or mailed.  Every string from the report
is escaped.  matplotlib (the ``html`` extra) draws the plot; without it the page
says so and keeps everything else.  Reports written before schema 1.1 (no timing,
verdict, summary or intervals) render with what they have.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

from dlopt.report import Candidate, Report

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 4px; font-size: 90%; }
p.headline { font-size: 1.15rem; font-weight: 600; background: #f6f8fa; border-left: 4px solid #1a7f37;
             padding: .5rem .8rem; }
p.headline.over { border-left-color: #cf222e; }
p.warning { background: #fff8c5; border: 1px solid #d4a72c; padding: .4rem .7rem; border-radius: 4px; }
table { border-collapse: collapse; margin: .5rem 0; width: 100%; }
th, td { border: 1px solid #d0d7de; padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { min-width: 11rem; }
table#candidates { font-size: 13px; }
tr.chosen td { background: #dafbe1; font-weight: 600; }
tr.tie td { background: #fff8c5; }
tr.rejected td, tr.failed td { color: #82071e; }
tr.unavailable td, tr.unsupported td { color: #656d76; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
figure { margin: 1rem 0; }
figure svg { max-width: 100%; height: auto; }
figcaption, .muted { color: #656d76; }
"""
NOISY_CV = 0.10  # as dlopt.timing.NOISY_CV: above it the page warns that the machine was noisy
STYLE = {"original": ("s", "#0969da"), "chosen": ("*", "#1a7f37"), "ok": ("o", "#57606a"),
         "rejected": ("X", "#cf222e")}
LEGEND = {"original": "original", "chosen": "chosen", "ok": "within budget", "rejected": "rejected"}


# -- words and numbers ------------------------------------------------------------------

def _units(report: Report) -> str:
    metric = report.budget.get("metric") or ""
    return report.budget.get("units") or ("percentage points" if metric.startswith("top-1") else "points")


def _drop_label(report: Report) -> str:
    """What a drop is, named wherever one is shown: ``drop in top-1 agreement (percentage points)``."""
    return f"drop in {report.budget.get('metric') or 'accuracy'} ({_units(report)})"


def _ms(latency: dict | None, key: str) -> str:
    value = (latency or {}).get(key)
    return f"{value:.3f}" if value is not None else "-"


def _interval(latency: dict | None) -> str:
    lo, hi = (latency or {}).get("ci_low_ms"), (latency or {}).get("ci_high_ms")
    return f"{lo:.3f}-{hi:.3f}" if lo is not None and hi is not None else "-"


def _speedup(report: Report, cand: Candidate, ties: Sequence[str]) -> str:
    speed = report.speedup(cand)
    if not speed:
        return "-"
    ci = (cand.measurement.latency or {}).get("speedup_ci")
    text = f"{speed:.2f}x" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")
    return text + (", tie" if cand.key in ties else "")


def headline(report: Report) -> str:
    """The one line at the top: the report's own summary, or one made from what an older report has."""
    if report.summary:
        return report.summary
    chosen = report.chosen_candidate()
    if chosen is None:
        return "nothing shipped"
    speed = report.speedup(chosen)
    return f"chosen {chosen.key}" + (f"; {speed:.2f}x the original's speed" if speed else "") + (
        "" if report.chosen else "; OVER THE ACCURACY BUDGET")


def timing_line(report: Report) -> tuple[str, str | None]:
    """(how latency was timed, a warning when the machine was too noisy to trust close results)."""
    timing = report.timing or {}
    base = report.baseline.latency or {}
    shape = timing.get("shape") or ", ".join(f"{k}={'x'.join(map(str, v))}"
                                             for k, v in (timing.get("shapes") or {}).items())
    runs, warmup = timing.get("runs", base.get("runs")), timing.get("warmup", base.get("warmup"))
    if runs is None:
        return f"Timing: not measured here (built for {report.target.get('name')})" + (
            f", shape {shape}" if shape else "") + ".", None
    parts = [f"shape {shape}" if shape else "shape not recorded (a report older than schema 1.1)",
             f"{timing.get('threads', base.get('threads', '?'))} threads",
             f"{runs} runs per model after {warmup} warm-up"
             + (", interleaved with the original in round-robin blocks" if timing.get("interleaved") else "")]
    cv = timing.get("noise_cv")
    if cv is not None:
        parts.append(f"noise (run-to-run cv) {cv * 100:.1f}%")
    warning = None
    if cv is not None and cv > NOISY_CV:
        warning = (f"The machine was noisy while timing: run-to-run variation reached {cv * 100:.0f}% "
                   f"(above {NOISY_CV * 100:.0f}%). Close results are ties; rerun on a quiet machine to separate them.")
    return "Timing: " + "; ".join(parts) + ".", warning


def format_energy(energy: dict | None) -> str:
    if not energy:
        return "-"
    joules = energy["joules_per_inference"]
    scale, unit = next(((s, u) for s, u in ((1, "J"), (1e-3, "mJ"), (1e-6, "µJ")) if joules >= s), (1e-9, "nJ"))
    return f"{joules / scale:.3g} {unit} ({energy['kind']})"


def _energy_notes(keys: list[str], energies: list[dict | None]) -> str:
    """Where each energy figure comes from, and (once) why no sensor was read."""
    from dlopt.energy import NO_SENSOR

    items, reasons = [], []
    for key, energy in zip(keys, energies, strict=True):
        if energy:
            source, _, why = energy["source"].partition(NO_SENSOR)
            items.append(f"<li>{escape(key)}: {escape(source)}, {energy['watts']:g} W</li>")
            if why and why not in reasons:
                reasons.append(why)
    why = "".join(f'<p class="muted">No power sensor was read: {escape(w)}.</p>' for w in reasons)
    return f'<details class="energy" open><summary>Energy sources</summary><ul>{"".join(items)}</ul></details>{why}'


def _table(headers: list[str], rows: list[list[Any]], *, numeric: set[int] = frozenset(), text: int | None = None,
           table_id: str | None = None, classes: list[str] | None = None) -> str:
    """``numeric`` columns align right; the ``text`` column (a sentence per row) gets room to breathe."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    kind = {**{j: ' class="num"' for j in numeric}, **({text: ' class="text"'} if text is not None else {})}
    body = []
    for i, row in enumerate(rows):
        css = f' class="{escape(classes[i])}"' if classes else ""
        cells = "".join(f"<td{kind.get(j, '')}>{escape(str(v))}</td>" for j, v in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def candidate_table(report: Report, raw: dict) -> str:
    ties = (report.verdict or {}).get("ties") or []
    headers = ["backend", "precision", "p50 ms", "p50 95% CI ms", "p90 ms", "p99 ms", "speedup (95% CI)",
               "size MB", "max rel err", _drop_label(report), "result"]
    base = report.baseline
    rows = [["original", "fp32", _ms(base.latency, "p50_ms"), _interval(base.latency), _ms(base.latency, "p90_ms"),
             _ms(base.latency, "p99_ms"), "1.00x", f"{base.size_bytes / 1e6:.3f}", "-", "0.00",
             "baseline (ONNX Runtime)"]]
    classes = ["original"]
    for c in report.candidates:
        m = c.measurement
        lat = m.latency if m else None
        result = c.reason or c.status
        if c.chosen:
            result = "CHOSEN" + (f": {c.reason}" if c.reason else "")
        rows.append([c.backend, c.precision + (f" (ran {c.ran_as})" if c.ran_as and c.ran_as != c.precision else ""),
                     _ms(lat, "p50_ms"), _interval(lat), _ms(lat, "p90_ms"), _ms(lat, "p99_ms"),
                     _speedup(report, c, ties), f"{m.size_bytes / 1e6:.3f}" if m else "-",
                     f"{c.fidelity['max_rel_error']:.2e}" if c.fidelity else "-",
                     f"{c.score['drop_pp']:.2f}" if c.score else "-", result])
        classes.append("chosen" if c.chosen else "tie" if c.key in ties else c.status)
    energies = [raw["baseline"].get("energy")] + [(c.get("measurement") or {}).get("energy")
                                                  for c in raw["candidates"]]
    if any(energies):
        headers.append("energy / inference")
        rows = [row + [format_energy(e)] for row, e in zip(rows, energies, strict=True)]
    table = _table(headers, rows, numeric=set(range(2, 10)) | ({11} if any(energies) else set()), text=10,
                   table_id="candidates", classes=classes)
    if any(energies):
        table += _energy_notes(["original"] + [c.key for c in report.candidates], energies)
    return table


# -- the plot ---------------------------------------------------------------------------

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


def plot_points(report: Report) -> tuple[list[Point], list[str]]:
    """(points to plot, lines for what could not be plotted)."""
    base = report.baseline.latency or {}
    ties = (report.verdict or {}).get("ties") or []
    points, missing = [], []
    for c in report.candidates:
        lat = (c.measurement.latency or {}) if c.measurement else {}
        if c.status in ("unavailable", "unsupported"):
            continue
        if lat.get("p50_ms") is None or c.score is None:
            why = "latency not measured" if lat.get("p50_ms") is None else "no accuracy score"
            missing.append(f"{c.key} ({c.status}): {why}" + (f" - {c.reason}" if c.reason else ""))
            continue
        role = "chosen" if c.key == report.chosen else ("ok" if c.status == "ok" else "rejected")
        speed = report.speedup(c)
        notes = [f"{speed:.2f}x"] if speed else []
        notes += ["chosen"] if role == "chosen" else ["tie"] if c.key in ties else []
        notes += ["written, over budget"] if role != "chosen" and (c.chosen or c.artifact_dir == ".") else []
        points.append(Point(f"{c.key} ({', '.join(notes)})" if notes else c.key, lat["p50_ms"], c.score["drop_pp"],
                            role, lat.get("ci_low_ms"), lat.get("ci_high_ms")))
    if base.get("p50_ms") is not None and points:
        points.insert(0, Point("original (1.00x)", base["p50_ms"], 0.0, "original", base.get("ci_low_ms"),
                               base.get("ci_high_ms")))
    return points, missing


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


def _plot_section(report: Report) -> str:
    points, missing = plot_points(report)
    if len(points) > 1:
        try:
            graphic = draw_plot(points, budget=report.budget.get("max_drop_pp"), drop_label=_drop_label(report)).svg
        except ImportError:
            graphic = '<p class="muted">The plot needs matplotlib: pip install "dlopt[html]".</p>'
    else:
        graphic = '<p class="muted">No candidate has both a latency and an accuracy score to plot.</p>'
    chosen = report.chosen_candidate() if report.chosen else None
    caption = (f"p50 latency (log scale) against the {_drop_label(report)}; the original (hollow square, drawn on "
               f"top) sits at its p50 and 0" + (f"; the chosen artefact, {chosen.key}, is the star." if chosen
                                                else "; nothing was chosen."))
    parts = [f'<figure id="latency-accuracy">{graphic}<figcaption>{escape(caption)}</figcaption></figure>']
    if missing:
        parts.append('<p>Not measured (not plotted):</p><ul class="not-measured">'
                     + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul>")
    return "\n".join(parts)


# -- the page ---------------------------------------------------------------------------

def _summary(r: Report) -> list[tuple[str, str]]:
    chosen = r.chosen_candidate() if r.chosen else None  # without r.chosen the flagged one missed the budget
    written = r.chosen_candidate()
    verdict = r.verdict or {}
    original = r.budget.get("original", 0)
    metric = r.budget.get("metric")
    shown = f"{original * 100:.2f}%" if (metric or "").startswith("top-1") else f"{original:.6g}"
    faster = verdict.get("faster_than_original")
    return [
        ("model", r.model.get("path") or "(in memory)"),
        ("sha256", r.model.get("sha256", "-")),
        ("inputs", ", ".join(r.model.get("inputs", []))),
        ("target", f"{r.target.get('name')} - {r.target.get('description', '')}"),
        ("evaluated on", f"{r.evaluation.get('source')} ({r.evaluation.get('feeds')} feeds)"),
        ("metric", f"{metric}; the original scores {shown}; drops are in {_units(r)}"),
        ("accuracy budget", f"{metric} may drop at most {r.budget.get('max_drop_pp')} ({_units(r)})"),
        ("chosen", (chosen.key + (f": {verdict['why']}" if verdict.get("why") else "")) if chosen else
         f"none met the budget; the closest, {written.key}, was written" if written else "none"),
        *([("faster than the original", "yes, beyond the 95% intervals" if faster else "not significantly")]
          if faster is not None else []),
        *([("ties", ", ".join(verdict["ties"]) + " (speed could not be told apart from the chosen one)")]
          if verdict.get("ties") else []),
        ("dlopt", f"{r.dlopt_version}, schema {r.schema_version}, {r.created}"),
    ]


def render_html(report: dict) -> str:
    """The whole page for a report.json dictionary."""
    r = Report.from_dict(report)
    model_name = Path(r.model.get("path") or "model").name
    title = f"dlopt report: {model_name} for {r.target.get('name')}"
    timing, warning = timing_line(r)
    over = " over" if r.chosen is None and r.chosen_candidate() is not None else ""
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="headline{over}" id="summary">{escape(headline(r))}</p>',
        f'<p class="timing" id="timing">{escape(timing)}</p>',
        *([f'<p class="warning" id="noise">{escape(warning)}</p>'] if warning else []),
        '<dl class="summary">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in _summary(r))
        + "</dl>",
        "<h2>Candidates</h2>", candidate_table(r, report),
        "<h2>Latency and accuracy</h2>", _plot_section(r),
    ]
    if r.float_node_rows():
        headers = ["candidate", "node kept in float", "op", f"{_drop_label(r)} if quantised alone", "output nmse"]
        body += ["<h2>Layers kept in float</h2>",
                 _table(headers, r.float_node_rows(), numeric={3, 4}, table_id="float")]
    if r.calibration:
        c = r.calibration
        body.append(f"<p>Calibration: {escape(str(c.get('samples')))} samples from {escape(str(c.get('source')))} "
                    f"({escape(str(c.get('method')))}), {escape(str(c.get('seconds')))} s.</p>")
    body += ["<h2>Passes</h2>", _table(r.PASS_HEADERS, r.pass_rows(), numeric={2}, table_id="passes")]
    if r.notes:
        body += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in r.notes) + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
