"""report.json as one self-contained HTML page: summary, tables and a latency/accuracy plot.

The page has no scripts and no external assets (inline CSS, the plot as inline
SVG), so it can be attached to a CI run or mailed.  Every string from the report
is escaped.  matplotlib (the ``html`` extra) draws the plot; without it the page
says so and keeps everything else.
"""

from __future__ import annotations

import io
from dataclasses import fields
from html import escape
from pathlib import Path
from typing import Any

from dlopt.report import Candidate, Measurement, Report

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 4px; font-size: 90%; }
table { border-collapse: collapse; margin: .5rem 0; width: 100%; }
th, td { border: 1px solid #d0d7de; padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.chosen td { background: #dafbe1; font-weight: 600; }
tr.rejected td, tr.failed td { color: #82071e; }
tr.unavailable td, tr.unsupported td { color: #656d76; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; }
dl.summary dt { font-weight: 600; }
dl.summary dd { margin: 0; }
figure { margin: 1rem 0; }
figure svg { max-width: 100%; height: auto; }
figcaption, .muted { color: #656d76; }
"""
NUMERIC = {"p50 ms", "p99 ms", "speedup", "size MB", "max rel err", "drop pp", "energy / inference"}


def _known(cls, raw: dict) -> dict:
    """Only the fields ``cls`` has: a 1.x report may carry fields added after this version."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _report(data: dict) -> Report:
    data = _known(Report, data)
    data["baseline"] = _known(Measurement, data["baseline"])
    cands = []
    for raw in data["candidates"]:
        raw = _known(Candidate, raw)
        if raw.get("measurement"):
            raw["measurement"] = _known(Measurement, raw["measurement"])
        cands.append(raw)
    return Report.from_dict({**data, "candidates": cands})


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


def _table(headers: list[str], rows: list[list[Any]], *, table_id: str | None = None,
           classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{escape(classes[i])}"' if classes else ""
        cells = "".join(f'<td class="num">{escape(str(v))}</td>' if h in NUMERIC else f"<td>{escape(str(v))}</td>"
                        for h, v in zip(headers, row, strict=True))
        body.append(f"<tr{css}>{cells}</tr>")
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _plot_svg(points: list[tuple[str, float, float, str]], budget: float | None) -> str:
    """Latency (x) against accuracy drop (y); each point (label, p50 ms, drop pp, role)."""
    import matplotlib

    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    style = {"original": ("s", "#0969da"), "chosen": ("*", "#1a7f37"), "ok": ("o", "#57606a"),
             "rejected": ("X", "#cf222e")}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dlopt", "font.size": 10}):
        fig = Figure(figsize=(10, 4.8))
        ax = fig.add_subplot()
        for role, (marker, colour) in style.items():
            mine = [p for p in points if p[3] == role]
            if mine:
                ax.scatter([p[1] for p in mine], [p[2] for p in mine], marker=marker, color=colour,
                           s=220 if role == "chosen" else 60, label=role, zorder=4 if role == "chosen" else 3,
                           edgecolors="white")
        offsets = [(8, 8), (8, -14), (8, 22), (8, -28)]  # staggered: nearby points often share a drop of 0
        for i, (label, x, y, role) in enumerate(p for p in points if p[3] != "chosen"):
            ax.annotate(label, (x, y), xytext=offsets[i % len(offsets)], textcoords="offset points",
                        color=style[role][1], fontsize=9)
        for label, x, y, _ in (p for p in points if p[3] == "chosen"):
            ax.annotate(f"chosen: {label}", (x, y), xytext=(10, 42), textcoords="offset points", ha="left",
                        fontweight="bold", color=style["chosen"][1],
                        arrowprops={"arrowstyle": "->", "color": style["chosen"][1]})
        if budget is not None:
            ax.axhline(budget, color="#bf8700", linestyle="--", linewidth=1, label=f"budget ({budget:g} pp)")
        ax.set_xlabel("p50 latency (ms) - lower is better")
        ax.set_ylabel("accuracy drop (percentage points)")
        ax.margins(x=0.1, y=0.15)
        ax.grid(True, alpha=.3)
        ax.legend(loc="best", fontsize=9)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _plot_section(report: Report) -> str:
    points = []
    base = (report.baseline.latency or {}).get("p50_ms")
    if base is not None:
        points.append(("original", base, 0.0, "original"))
    missing = []
    for c in report.candidates:
        p50 = (c.measurement.latency or {}).get("p50_ms") if c.measurement else None
        if c.status in ("unavailable", "unsupported"):
            continue
        if p50 is None or c.score is None:
            why = "latency not measured" if p50 is None else "no accuracy score"
            missing.append(f"{c.key} ({c.status}): {why}" + (f" - {c.reason}" if c.reason else ""))
            continue
        role = "chosen" if c.key == report.chosen else ("ok" if c.status == "ok" else "rejected")
        label = f"{c.key} (written, over budget)" if c.chosen and role != "chosen" else c.key
        points.append((label, p50, c.score["drop_pp"], role))
    if len(points) > (base is not None):
        try:
            graphic = _plot_svg(points, report.budget.get("max_drop_pp"))
        except ImportError:
            graphic = '<p class="muted">The plot needs matplotlib: pip install "dlopt[html]".</p>'
    else:
        graphic = '<p class="muted">No candidate has both a latency and an accuracy score to plot.</p>'
    chosen = report.chosen_candidate() if report.chosen else None
    caption = ("Latency against accuracy drop; the original model sits at (its p50, 0)"
               + (f"; the chosen artefact, {chosen.key}, is the star." if chosen else "; nothing was chosen."))
    parts = [f'<figure id="latency-accuracy">{graphic}<figcaption>{escape(caption)}</figcaption></figure>']
    if missing:
        parts.append('<p>Not measured (not plotted):</p><ul class="not-measured">'
                     + "".join(f"<li>{escape(m)}</li>" for m in missing) + "</ul>")
    return "\n".join(parts)


def render_html(report: dict) -> str:
    """The whole page for a report.json dictionary."""
    r = _report(report)
    chosen = r.chosen_candidate() if r.chosen else None  # without r.chosen the flagged one missed the budget
    written = r.chosen_candidate()
    model_name = Path(r.model.get("path") or "model").name
    title = f"dlopt report: {model_name} for {r.target.get('name')}"
    speed = r.speedup(chosen) if chosen else None
    summary = [
        ("model", r.model.get("path") or "(in memory)"),
        ("sha256", r.model.get("sha256", "-")),
        ("inputs", ", ".join(r.model.get("inputs", []))),
        ("target", f"{r.target.get('name')} - {r.target.get('description', '')}"),
        ("evaluated on", f"{r.evaluation.get('source')} ({r.evaluation.get('feeds')} feeds)"),
        ("accuracy budget", f"{r.budget.get('metric')} may drop at most {r.budget.get('max_drop_pp')} points "
                            f"(original: {r.budget.get('original', 0) * 100:.2f}%)"),
        ("chosen", (chosen.key + (f", {speed}x the original's speed" if speed else "")) if chosen else
         f"none met the budget; the closest, {written.key}, was written" if written else "none"),
        ("dlopt", f"{r.dlopt_version}, schema {r.schema_version}, {r.created}"),
    ]
    headers, rows = list(r.CANDIDATE_HEADERS), r.candidate_rows()
    energies = [report["baseline"].get("energy")] + [
        (c.get("measurement") or {}).get("energy") for c in report["candidates"]]
    if any(energies):
        headers.append("energy / inference")
        rows = [row + [format_energy(e)] for row, e in zip(rows, energies, strict=True)]
    classes = ["original"] + ["chosen" if chosen is c else c.status for c in r.candidates]
    body = [
        f"<h1>{escape(title)}</h1>",
        '<dl class="summary">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in summary)
        + "</dl>",
        "<h2>Candidates</h2>", _table(headers, rows, table_id="candidates", classes=classes),
    ]
    if any(energies):
        body.append(_energy_notes(["original"] + [c.key for c in r.candidates], energies))
    body += ["<h2>Latency and accuracy</h2>", _plot_section(r)]
    if r.float_node_rows():
        body += ["<h2>Layers kept in float</h2>", _table(r.FLOAT_NODE_HEADERS, r.float_node_rows(), table_id="float")]
    if r.calibration:
        c = r.calibration
        body.append(f"<p>Calibration: {escape(str(c.get('samples')))} samples from {escape(str(c.get('source')))} "
                    f"({escape(str(c.get('method')))}), {escape(str(c.get('seconds')))} s.</p>")
    body += ["<h2>Passes</h2>", _table(r.PASS_HEADERS, r.pass_rows(), table_id="passes")]
    if r.notes:
        body += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in r.notes) + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
