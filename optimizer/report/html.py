"""report.json as one self-contained HTML page: summary, timing, tables and a latency/accuracy plot.

The page has no scripts and no external assets (inline CSS, the plot as inline
SVG), so it can be attached to a CI run or mailed.  Every string from the report
is escaped.  matplotlib (the ``html`` extra) draws the plot; without it the page
says so and keeps everything else.  Reports written before schema 1.1 (no timing,
verdict, summary or intervals) render with what they have.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

from dlopt.report import sections
from dlopt.report.data import Candidate, DEVICE_HEADERS, Report, device_heading, device_rows
from dlopt.report.plot import Point, draw_plot
from dlopt.report.sections.base import html_table as _table

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
    return text + (f", {_tie_word(cand)}" if cand.key in ties else "")


def _tie_word(cand: Candidate) -> str:
    """'tie' only for a gain under the 5% that counts; overlapping intervals or too few runs are 'not told apart'."""
    return "tie" if (cand.reason or "").startswith("tie with") else "not told apart"


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


def candidate_table(report: Report) -> str:
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
        result += "".join(f"; {fact}" for fact in sections.candidate_facts(report, c))
        rows.append([c.backend, c.precision + (f" (ran {c.ran_as})" if c.ran_as and c.ran_as != c.precision else ""),
                     _ms(lat, "p50_ms"), _interval(lat), _ms(lat, "p90_ms"), _ms(lat, "p99_ms"),
                     _speedup(report, c, ties), f"{m.size_bytes / 1e6:.3f}" if m else "-",
                     f"{c.fidelity.max_rel_error:.2e}" if c.fidelity else "-",
                     f"{c.score.drop_pp:.2f}" if c.score else "-", result])
        classes.append("chosen" if c.chosen else "tie" if c.key in ties else c.status)
    columns = sections.html_columns(report)  # energy per inference, ...
    numeric = set(range(2, 10)) | set(range(len(headers), len(headers) + len(columns)))
    for header, cells, _ in columns:
        headers.append(header)
        rows = [row + [cell] for row, cell in zip(rows, cells, strict=True)]
    table = _table(headers, rows, numeric=numeric, text=10, table_id="candidates", classes=classes)
    return table + "".join(after for _, _, after in columns)


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
        notes += ["chosen"] if role == "chosen" else [_tie_word(c)] if c.key in ties else []
        notes += ["written, over budget"] if role != "chosen" and (c.chosen or c.artifact_dir == ".") else []
        points.append(Point(f"{c.key} ({', '.join(notes)})" if notes else c.key, lat["p50_ms"], c.score.drop_pp,
                            role, lat.get("ci_low_ms"), lat.get("ci_high_ms")))
    if base.get("p50_ms") is not None and points:
        points.insert(0, Point("original (1.00x)", base["p50_ms"], 0.0, "original", base.get("ci_low_ms"),
                               base.get("ci_high_ms")))
    return points, missing


def _plot_section(report: Report) -> str:
    points, missing = plot_points(report)
    caption = ""  # only a plot drawn gets one
    if len(points) < 2:
        graphic = '<p class="muted">No candidate has both a latency and an accuracy score to plot.</p>'
    else:
        try:
            graphic = draw_plot(points, budget=report.budget.get("max_drop_pp"), drop_label=_drop_label(report)).svg
        except ImportError:
            graphic = '<p class="muted">The plot needs matplotlib: pip install "dlopt[html]".</p>'
        else:
            chosen = report.chosen_candidate() if report.chosen else None
            caption = (f"p50 latency (log scale) against the {_drop_label(report)}; the original (hollow square, "
                       f"drawn on top) sits at its p50 and 0" + (f"; the chosen artefact, {chosen.key}, is the star."
                                                                 if chosen else "; nothing was chosen."))
    caption = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    parts = [f'<figure id="latency-accuracy">{graphic}{caption}</figure>']
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
        *sections.facts(r),
        ("dlopt", f"{r.dlopt_version}, schema {r.schema_version}, {r.created}"),
    ]


def render_html(report: dict, device: dict | None = None) -> str:
    """The whole page for a report.json dictionary (and a device_report.json, when there is one)."""
    r = Report.from_dict(report)
    model_name = Path(r.model.get("path") or "model").name
    title = f"dlopt report: {model_name} for {r.target.get('name')}"
    over = " over" if r.chosen is None and r.chosen_candidate() is not None else ""
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="headline{over}" id="summary">{escape(headline(r))}</p>',
        *sections.html(r, sections.HEAD),
        '<dl class="summary">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in _summary(r))
        + "</dl>",
        "<h2>Candidates</h2>", candidate_table(r),
        "<h2>Latency and accuracy</h2>", _plot_section(r),
    ]
    body += sections.html(r, sections.BODY)
    body += ["<h2>Passes</h2>", _table(r.PASS_HEADERS, r.pass_rows(), numeric={2}, table_id="passes")]
    if device:
        body += ["<h2>Measured on the device</h2>", f"<p>{escape(device_heading(device))}</p>",
                 _table(DEVICE_HEADERS, device_rows(device), numeric={5}, table_id="device"),
                 f"<p>{escape(str(device.get('why') or ''))}</p>"]
    body += sections.html(r, sections.END)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
