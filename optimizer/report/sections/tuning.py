"""TVM tuning applied to a build (``candidates[].tuning``: the database, tasks tuned of all, the summary line).

One clause on the candidate's row of every candidate table (report.md, report.html, the terminal) and on its
line in the output folder's README: "4 of 5 tasks tuned from <database> (64 trials)".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlopt.report.sections.base import Section

if TYPE_CHECKING:  # the gate's import of the sections loads no backend package
    from dlopt.targets.tvm.tuning_db import TuningApplied


def line(tuning: "TuningApplied | dict | None") -> str | None:
    """The clause, from the typed value or report.json's dictionary; None when no database was applied."""
    summary = tuning.get("summary") if isinstance(tuning, dict) else tuning.summary if tuning else None
    return str(summary) if summary else None


class Tuning(Section):
    candidate_key = "tuning"

    def candidate_fact(self, report, candidate):
        return line(candidate.tuning)
