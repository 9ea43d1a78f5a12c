"""``notes``: what a reader should know (calibrated on random data, a search stopped at its time limit, ...)."""

from __future__ import annotations

from html import escape

from dlopt.report.sections.base import END, Section, escape_markdown


class Notes(Section):
    key = "notes"
    slot = END

    def markdown(self, report):
        notes = self.value(report)
        return ["", "## Notes", "", *[f"- {escape_markdown(n)}" for n in notes]] if notes else []

    def html(self, report):
        notes = self.value(report)
        return ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"] if notes else []

    def terminal(self, report):
        return [f"note: {note}" for note in self.value(report) or []]
