"""INT8 calibration: how many samples from where, by which method, in how long and at what memory cost.

Owns ``calibration`` (dlopt.flow.ranges.RangeStats.to_dict() + source and recipe; null without INT8).
"""

from __future__ import annotations

from html import escape

from dlopt.report.sections.base import Escape, Section, escape_markdown, plain


def line(c: dict, esc: Escape = plain) -> str:
    """The calibration line, once: "32 samples from calib.npz (minmax), 0.057 s" (``esc`` for the source and
    method, the strings that came from the user)."""
    return (f"{c.get('samples')} samples from {esc(str(c.get('source')))} ({esc(str(c.get('method')))}), "
            f"{c.get('seconds')} s")


def memory(c: dict) -> str:
    return f"peak RSS {c.get('peak_rss_mb')} MB (+{c.get('rss_increase_mb')} MB)"


class Calibration(Section):
    key = "calibration"
    schema = ("object?", {"samples": "count?", "source": "string?", "method": "string?", "seconds": "amount?"})

    def collect(self, job, ev, builds):
        return ev.calibration

    def markdown(self, report):
        c = self.value(report)
        return [f"Calibration: {line(c, escape_markdown)}, process {memory(c)}.", ""] if c else []

    def html(self, report):
        c = self.value(report)
        return [f"<p>{escape(f'Calibration: {line(c)}.')}</p>"] if c else []

    def terminal(self, report):
        c = self.value(report)
        return ["", f"calibration: {line(c)}, {memory(c)}"] if c else []
