"""What a report section is, and the text helpers every section's renderings share.

A section owns one part of a report: the top-level report.json field it keeps (``key``),
that field's entry in the schema check (``schema``), how the compile fills it
(``collect``), and its Markdown, HTML and terminal renderings.  ``Report``, the schema
check, report.md, report.html and the CLI's printer iterate over the registry in
``dlopt.report.sections``; they read no section's JSON keys themselves.
"""

from __future__ import annotations

import re
from html import escape
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from tabulate import tabulate

if TYPE_CHECKING:
    from dlopt.report.data import Candidate, Report

HEAD, FACTS, BODY, END = "head", "facts", "body", "end"


class Section:
    """One part of the report; subclasses override what they render.

    ``slot`` says where its renderings go, the same place in every rendering: ``head``: under the title
    (report.html: under the headline; the terminal: before the pass table); ``facts``: one line among the
    report's facts (a bullet at the top of report.md, a row of report.html's summary list), from ``fact``;
    ``body``: after the candidate tables; ``end``: after everything else.
    """

    key: ClassVar[str | None] = None  # the top-level report.json field it owns; None: it renders others' fields
    schema: ClassVar[Any] = None  # that field in the schema check (dlopt.report.schema): "kind" or (kind, fields)
    slot: ClassVar[str] = BODY
    label: ClassVar[str] = ""  # facts: its name in report.html's summary list
    candidate_key: ClassVar[str | None] = None  # the field of each candidate it owns (``candidates[].tuning``)
    # its fields of a measurement (the baseline's and each candidate's) in the schema check: {field: kind}
    measurement_schema: ClassVar[dict[str, Any]] = {}

    def value(self, report: "Report") -> Any:
        return report.section(self.key) if self.key else None

    def collect(self, job, ev, builds) -> Any:
        """The field's value at the end of a compile (dlopt.flow.write.assemble's stages); NotImplemented: the
        flow fills it itself."""
        return NotImplemented

    def fact(self, report: "Report") -> str | None:  # slot "facts"
        return None

    def markdown(self, report: "Report") -> list[str]:  # lines of report.md (slots "head", "body" and "end")
        return []

    def html(self, report: "Report") -> list[str]:  # elements of report.html (slots "head", "body" and "end")
        return []

    def terminal(self, report: "Report") -> list[str]:  # lines `dlopt compile` prints (slots "head", "body", "end")
        return []

    def candidate_fact(self, report: "Report", candidate: "Candidate") -> str | None:
        """A clause on the candidate's row of every candidate table (report.md, report.html, the terminal)."""
        return None

    def html_column(self, report: "Report") -> tuple[str, list[str], str] | None:
        """A column of report.html's candidate table: (header, one cell per row, the original's first, HTML
        after the table); None: no column."""
        return None


# Markdown (GitHub's, in PR comments too) read as text: no HTML, no @mention pings, no code
# spans, links or table cells opened by a name.  ``@`` keeps its look but is followed by a
# zero-width space, which GitHub does not link (the usual bot convention).  ``>`` stays as it is
# ("8 -> 6" reads so in the raw file too): with every ``<`` escaped it closes no tag, and only a
# leading one (a block quote) is escaped.
_MARKDOWN = str.maketrans({"&": "&amp;", "<": "&lt;", "@": "@&#8203;", "\\": "\\\\",
                           "`": "\\`", "|": "\\|", "[": "\\[", "]": "\\]"})
_QUOTE = re.compile(r"^(\s*)>")


def escape_markdown(text: str) -> str:
    """``text`` as literal Markdown on one line, safe in a table cell; not for use inside a code span."""
    return _QUOTE.sub(r"\1\\>", " ".join(str(text).splitlines()).translate(_MARKDOWN))


def markdown_table(rows: list[list[Any]], headers: list[str]) -> str:
    """A GitHub table, every cell escaped."""
    return tabulate([[escape_markdown(str(v)) for v in row] for row in rows], headers=headers, tablefmt="github")


def terminal_table(rows: list[list[Any]], headers: list[str]) -> str:
    return tabulate(rows, headers=headers)


def html_table(headers: list[str], rows: list[list[Any]], *, numeric: set[int] = frozenset(), text: int | None = None,
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


def plain(text: str) -> str:
    return text


Escape = Callable[[str], str]
