"""``timing``: the declared shape every latency was timed at, threads, runs and the machine's noise (schema 1.1).

report.html says it under the headline, with a warning when the machine was too noisy to trust close results;
the summary line (dlopt.flow.write.summary_line) says it too.
"""

from __future__ import annotations

from html import escape

from dlopt.measure.timing import NOISY_CV
from dlopt.report.sections.base import HEAD, Section


def line(report) -> tuple[str, str | None]:
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


class Timing(Section):
    key = "timing"
    schema = ("object?", {"shape": "string?", "threads": "count?", "runs": "count?", "noise_cv": "amount?"})
    slot = HEAD

    def html(self, report):
        timing, warning = line(report)
        return [f'<p class="timing" id="timing">{escape(timing)}</p>',
                *([f'<p class="warning" id="noise">{escape(warning)}</p>'] if warning else [])]
