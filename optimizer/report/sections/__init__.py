"""The report's sections, in the order they render: a new section is one module here and one line in SECTIONS.

``Report`` (report.json and report.md), ``dlopt.report.schema``, ``dlopt.report.html`` and the
CLI's printer read ``SECTIONS`` when they run, so a section added to it (in a test, monkeypatched)
shows everywhere.
"""

from __future__ import annotations

from typing import Any

from dlopt.report.sections.base import BODY, END, FACTS, HEAD, Section
from dlopt.report.sections.calibration import Calibration
from dlopt.report.sections.energy import Energy
from dlopt.report.sections.float_nodes import FloatNodes
from dlopt.report.sections.mcu import Mcu
from dlopt.report.sections.notes import Notes
from dlopt.report.sections.pruning import Pruning
from dlopt.report.sections.serving import Serving
from dlopt.report.sections.timing import Timing
from dlopt.report.sections.tuning import Tuning

SECTIONS: list[Section] = [
    Timing(),
    Tuning(),
    Mcu(),
    Pruning(),
    FloatNodes(),
    Calibration(),
    Energy(),
    Serving(),
    Notes(),
]


def in_slot(slot: str) -> list[Section]:
    return [s for s in SECTIONS if s.slot == slot]


def schema() -> dict[str, Any]:
    """The sections' entries in the report's schema check."""
    return {s.key: s.schema for s in SECTIONS if s.key and s.schema}


def collect(job, ev, builds) -> dict[str, Any]:
    """The values of the fields the sections fill themselves at the end of a compile."""
    values = {s.key: s.collect(job, ev, builds) for s in SECTIONS if s.key}
    return {k: v for k, v in values.items() if v is not NotImplemented}


def measurement_schema() -> dict[str, Any]:
    """The sections' fields of a measurement (baseline and candidates) in the schema check."""
    return {k: v for s in SECTIONS for k, v in s.measurement_schema.items()}


def candidate_facts(report, candidate) -> list[str]:
    """The clauses the sections add to a candidate's row: "4 of 5 tasks tuned from DB (64 trials)"."""
    return [fact for s in SECTIONS if (fact := s.candidate_fact(report, candidate))]


def html_columns(report) -> list[tuple[str, list[str], str]]:
    """The columns the sections add to report.html's candidate table."""
    return [column for s in SECTIONS if (column := s.html_column(report))]


def facts(report) -> list[tuple[str, str]]:
    """(label, line) of every facts section that has something to say."""
    return [(s.label, line) for s in in_slot(FACTS) if (line := s.fact(report))]


def markdown(report, slot: str) -> list[str]:
    return [line for s in in_slot(slot) for line in s.markdown(report)]


def html(report, slot: str) -> list[str]:
    return [part for s in in_slot(slot) for part in s.html(report)]


def terminal(report, slots: tuple[str, ...] = (BODY, END)) -> list[str]:
    """What the CLI prints: (HEAD,) before the pass table; (BODY, END) after the candidate table, before the
    summary line."""
    return [line for slot in slots for s in in_slot(slot) for line in s.terminal(report)]


__all__ = ["BODY", "END", "FACTS", "HEAD", "SECTIONS", "Section", "candidate_facts", "collect", "facts", "html",
           "html_columns", "in_slot", "markdown", "measurement_schema", "schema", "terminal"]
