"""``serving``: the served configurations measured for a latency objective, and the one chosen.

Written by ``dlopt loadtest OUT --tune`` (dlopt.workflows.serve_tune.record), not by the compile:
null until then.  Renders a table per configuration (its best level that holds the objective) and,
in report.html, throughput against p99 for every level of every configuration.
"""

from __future__ import annotations

from html import escape

from dlopt.report.sections.base import END, Section, escape_markdown, html_table, markdown_table

_HEADERS = ["configuration", "best level within the objective", "throughput/s", "p99 ms"]
_COLOURS = ("#0969da", "#1a7f37", "#cf222e", "#8250df", "#bf8700", "#57606a", "#e16f24", "#1b7c83")


def _label(trial: dict) -> str:
    batching = (f"batch {trial.get('max_batch_size')}, delay {trial.get('max_queue_delay_us')} us"
                if trial.get("max_batch_size") else "batching off")
    return f"{batching}, {trial.get('instances')} x {trial.get('threads')} threads"


def _rows(serving: dict) -> list[list]:
    chosen = serving.get("chosen") or {}
    keys = ("max_batch_size", "max_queue_delay_us", "instances", "threads")
    rows = []
    for t in serving.get("trials") or []:
        mark = " (chosen)" if chosen and all(t.get(k) == chosen.get(k) for k in keys) else ""
        best = t.get("best_concurrency")
        level = next((lv for lv in t.get("levels") or [] if lv.get("concurrency") == best), None)
        rows.append([_label(t) + mark, f"concurrency {best}" if best is not None else "none holds",
                     t.get("throughput_at_objective") if best is not None else "-",
                     level.get("p99_ms") if level else "-"])
    return rows


def _where(serving: dict) -> str:
    host = serving.get("measured_on") or {}
    machine = " ".join(str(v) for v in (host.get("machine", "?"), host.get("processor")) if v)
    return (f"objective {serving.get('objective')}; {serving.get('load')}; measured on {machine} "
            f"({host.get('cores', '?')} cores) in {serving.get('seconds')} s")


def plot_svg(serving: dict, width: int = 560, height: int = 300) -> str:
    """Throughput against p99 latency, one line per configuration through its concurrency levels."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    series = [(_label(t), [(lv["p99_ms"], lv["throughput"]) for lv in t.get("levels") or []
                           if number(lv.get("p99_ms")) and number(lv.get("throughput"))])
              for t in serving.get("trials") or []]
    points = [p for _, s in series for p in s]
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
    for k, (label, pts) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, sorted(pts)))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>' for x, y in map(xy, pts)]
        parts.append(f'<text x="{right + 8}" y="{top + 12 + 14 * k}" font-size="11" fill="{colour}">'
                     f'{escape(label)}</text>')
    return "".join(parts) + "</svg>"


class Serving(Section):
    key = "serving"
    slot = END
    schema = ("object?", {"objective": "string?", "chosen": ("object?", {"max_batch_size": "count",
                                                                        "max_queue_delay_us": "count",
                                                                        "instances": "count"}),
                          "trials": ("array?", {"levels": ("array?", {"throughput": "amount?",
                                                                      "p99_ms": "amount?"})})})

    def collect(self, job, ev, builds):
        return None  # written by dlopt loadtest --tune, after the compile

    def markdown(self, report):
        s = self.value(report)
        if not s:
            return []
        lines = ["", "## Serving", "", escape_markdown(_where(s)), "", markdown_table(_rows(s), _HEADERS)]
        if s.get("batching_off_because"):
            lines += ["", f"Batching off: {escape_markdown(s['batching_off_because'])}"]
        return lines

    def html(self, report):
        s = self.value(report)
        if not s:
            return []
        parts = ["<h2>Serving</h2>", f"<p>{escape(_where(s))}</p>",
                 html_table(_HEADERS, _rows(s), numeric={2, 3}), plot_svg(s)]
        if s.get("batching_off_because"):
            parts.append(f"<p>Batching off: {escape(s['batching_off_because'])}</p>")
        return [p for p in parts if p]

    def terminal(self, report):
        s = self.value(report)
        return [f"serving: {_where(s)}; chosen {_label(s['chosen']) if s.get('chosen') else 'none holds'}"] if s else []
