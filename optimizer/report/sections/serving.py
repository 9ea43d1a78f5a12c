"""``serving``: the served configurations measured for a latency objective, and the one chosen.

Written by ``dlopt loadtest OUT --tune`` (dlopt.workflows.serve_tune.record), not by the compile:
null until then.  Renders a table per configuration (the median over its rounds of the throughput
at the objective, and their range) and, in report.html, throughput against p99 for every level.

Two shapes are read: a trial with ``rounds`` (each round's levels; since the tuner measures every
configuration in several rotated rounds) and, from older reports, a trial with its one round's
``levels`` and ``throughput_at_objective`` directly.
"""

from __future__ import annotations

import statistics
from html import escape

from dlopt.report.sections.base import END, Section, escape_markdown, html_table, markdown_table

HEADERS = ["configuration", "rounds within the objective", "median throughput/s", "range/s", "median p99 ms"]
_COLOURS = ("#0969da", "#1a7f37", "#cf222e", "#8250df", "#bf8700", "#57606a", "#e16f24", "#1b7c83")
_KEYS = ("max_batch_size", "max_queue_delay_us", "instances", "threads")


def _label(trial: dict) -> str:
    batching = (f"batch {trial.get('max_batch_size')}, delay {trial.get('max_queue_delay_us')} us"
                if trial.get("max_batch_size") else "batching off")
    return f"{batching}, {trial.get('instances')} x {trial.get('threads')} threads"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rounds_of(trial: dict) -> list[dict]:
    """A trial's rounds: ``rounds``, or an old report's single round (the trial's own levels)."""
    if isinstance(trial.get("rounds"), list):
        return [r for r in trial["rounds"] if isinstance(r, dict)]
    return [{"levels": trial.get("levels") or [], "throughput_at_objective": trial.get("throughput_at_objective"),
             "best_concurrency": trial.get("best_concurrency")}]


def _best_level(run: dict) -> dict | None:
    best = run.get("best_concurrency")
    return next((lv for lv in run.get("levels") or [] if isinstance(lv, dict) and best is not None
                 and lv.get("concurrency") == best), None)


def rows(serving: dict) -> list[list]:
    """One row per configuration: rounds held, median throughput at the objective and range, median p99."""
    chosen = serving.get("chosen") or {}
    out = []
    for t in serving.get("trials") or []:
        mark = " (chosen)" if chosen and all(t.get(k) == chosen.get(k) for k in _KEYS) else ""
        runs = rounds_of(t)
        figures = [r.get("throughput_at_objective") if _number(r.get("throughput_at_objective")) else 0.0
                   for r in runs]
        held = sum(_number(r.get("throughput_at_objective")) for r in runs)
        p99 = [lv["p99_ms"] for lv in map(_best_level, runs) if lv and _number(lv.get("p99_ms"))]
        median = statistics.median(figures) if figures else 0.0
        out.append([_label(t) + mark, f"{held}/{len(runs)}", f"{median:.1f}" if 2 * held > len(runs) else "-",
                    f"{min(figures):.0f}-{max(figures):.0f}" if len(figures) > 1 else "-",
                    f"{statistics.median(p99):.2f}" if p99 else "-"])
    return out


def _where(serving: dict) -> str:
    host = serving.get("measured_on") or {}
    machine = " ".join(str(v) for v in (host.get("machine", "?"), host.get("processor")) if v)
    return (f"objective {serving.get('objective')}; {serving.get('load')}; measured on {machine} "
            f"({host.get('cores', '?')} cores) in {serving.get('seconds')} s")


def _point(level) -> bool:
    return isinstance(level, dict) and _number(level.get("p99_ms")) and _number(level.get("throughput"))


def _median_curve(trial: dict) -> list[tuple[float, float]]:
    """(p99, throughput) per concurrency, each the median over the rounds that measured it."""
    by_load: dict = {}
    for r in rounds_of(trial):
        for lv in r.get("levels") or []:
            if _point(lv):
                by_load.setdefault(lv.get("concurrency"), []).append((lv["p99_ms"], lv["throughput"]))
    return [(statistics.median(p for p, _ in pts), statistics.median(t for _, t in pts)) for pts in by_load.values()]


def plot_svg(serving: dict, width: int = 560, height: int = 300) -> str:
    """Throughput against p99 latency: a line per configuration through its levels' medians over the rounds, a
    dot per level of every round."""
    series = [(_label(t), _median_curve(t), [(lv["p99_ms"], lv["throughput"]) for r in rounds_of(t)
                                              for lv in r.get("levels") or [] if _point(lv)])
              for t in serving.get("trials") or []]
    points = [p for _, _, dots in series for p in dots]
    if not points:
        return ""
    x_max = max(p[0] for p in points) * 1.05 or 1.0
    y_max = max(p[1] for p in points) * 1.05 or 1.0
    left, bottom, right, top = 56, height - 36, width - 190, 12

    def xy(p):
        return (left + (right - left) * p[0] / x_max, bottom - (bottom - top) * p[1] / y_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="throughput against p99 latency">',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#57606a"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{top}" stroke="#57606a"/>',
             f'<text x="{(left + right) / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">p99 latency, ms '
             f'(0 to {x_max:.3g})</text>',
             f'<text x="12" y="{(top + bottom) / 2:.0f}" font-size="11" text-anchor="middle" '
             f'transform="rotate(-90 12 {(top + bottom) / 2:.0f})">requests/s (0 to {y_max:.4g})</text>']
    for k, (label, curve, dots) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, sorted(curve)))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{colour}" fill-opacity="0.5"/>'
                  for x, y in map(xy, dots)]
        parts.append(f'<text x="{right + 8}" y="{top + 12 + 14 * k}" font-size="11" fill="{colour}">'
                     f'{escape(label)}</text>')
    return "".join(parts) + "</svg>"


_LEVELS = ("array?", {"throughput": "amount?", "p99_ms": "amount?"})


def _why(serving: dict) -> str:
    return f"Chosen: {serving['why']}" if isinstance(serving.get("why"), str) and serving["why"] else ""


class Serving(Section):
    key = "serving"
    slot = END
    schema = ("object?", {"objective": "string?", "chosen": ("object?", {"max_batch_size": "count",
                                                                        "max_queue_delay_us": "count",
                                                                        "instances": "count"}),
                          "rounds": "count?", "why": "string?",
                          "trials": ("array?", {"levels": _LEVELS, "throughput_at_objective": "amount?",
                                                "throughput_low": "amount?", "throughput_high": "amount?",
                                                "rounds": ("array?", {"levels": _LEVELS,
                                                                      "throughput_at_objective": "amount?"})})})

    def collect(self, job, ev, builds):
        return None  # written by dlopt loadtest --tune, after the compile

    def markdown(self, report):
        s = self.value(report)
        if not s:
            return []
        lines = ["", "## Serving", "", escape_markdown(_where(s)), "", markdown_table(rows(s), HEADERS)]
        if _why(s):
            lines += ["", escape_markdown(_why(s))]
        if s.get("batching_off_because"):
            lines += ["", f"Batching off: {escape_markdown(s['batching_off_because'])}"]
        return lines

    def html(self, report):
        s = self.value(report)
        if not s:
            return []
        parts = ["<h2>Serving</h2>", f"<p>{escape(_where(s))}</p>",
                 html_table(HEADERS, rows(s), numeric={2, 3, 4}), f"<p>{escape(_why(s))}</p>" if _why(s) else "",
                 plot_svg(s)]
        if s.get("batching_off_because"):
            parts.append(f"<p>Batching off: {escape(s['batching_off_because'])}</p>")
        return [p for p in parts if p]

    def terminal(self, report):
        s = self.value(report)
        return [f"serving: {_where(s)}; chosen {_label(s['chosen']) if s.get('chosen') else 'none holds'}"] if s else []
