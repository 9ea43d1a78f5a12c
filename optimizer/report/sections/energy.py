"""Energy per inference: the original's and each candidate's (``measurement.energy``: joules_per_inference,
kind, source, watts), measured by a power sensor or estimated from the target's power model.

report.html adds it as a column of the candidate table, with where each figure came from beneath.
"""

from __future__ import annotations

from html import escape

from dlopt.measure.energy import NO_SENSOR
from dlopt.report.sections.base import Section


def format_energy(energy: dict | None) -> str:
    """ "3.2 mJ (estimated)"; "-" without a figure."""
    if not energy:
        return "-"
    joules = energy["joules_per_inference"]
    scale, unit = next(((s, u) for s, u in ((1, "J"), (1e-3, "mJ"), (1e-6, "µJ")) if joules >= s), (1e-9, "nJ"))
    return f"{joules / scale:.3g} {unit} ({energy['kind']})"


def _sources(keys: list[str], energies: list[dict | None]) -> str:
    """Where each energy figure comes from, and (once) why no sensor was read."""
    items, reasons = [], []
    for key, energy in zip(keys, energies, strict=True):
        if energy:
            source, _, why = energy["source"].partition(NO_SENSOR)
            items.append(f"<li>{escape(key)}: {escape(source)}, {energy['watts']:g} W</li>")
            if why and why not in reasons:
                reasons.append(why)
    why = "".join(f'<p class="muted">No power sensor was read: {escape(w)}.</p>' for w in reasons)
    return f'<details class="energy" open><summary>Energy sources</summary><ul>{"".join(items)}</ul></details>{why}'


class Energy(Section):
    measurement_schema = {"energy": ("object?", {"joules_per_inference": "amount", "kind": "string"})}  # absent in older reports

    def html_column(self, report):
        energies = [report.baseline.energy] + [c.measurement.energy if c.measurement else None
                                               for c in report.candidates]
        if not any(energies):
            return None
        return ("energy / inference", [format_energy(e) for e in energies],
                _sources(["original"] + [c.key for c in report.candidates], energies))
