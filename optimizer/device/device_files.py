"""The files every output carries for its device: verify.npz and run_candidates.py.

``verify.npz`` holds a few evaluation feeds, the original's outputs on them and, per
shipped candidate, the error it showed when built and the error it may show on the
device (``dlopt.device.device_check``).  ``run_candidates.py`` is ``dlopt/measure/fidelity.py``,
``dlopt/measure/timing.py``, ``dlopt/device/device_guard.py`` and ``dlopt/device/device_check.py`` pasted into one script, so the device
check that runs without dlopt is the same code as ``dlopt verify`` and ``dlopt bench``.
"""

from __future__ import annotations

from pathlib import Path

from dlopt import __version__
from dlopt.device.device_check import SCRIPT, VERIFY_FILE, allowed_error, verify_feeds, write_verify

_SOURCES = ("measure/fidelity.py", "measure/timing.py", "device/device_guard.py", "device/device_check.py")
_FUTURE = "from __future__ import annotations\n"


def script_source() -> str:
    """run_candidates.py: the four numpy-only modules, one after the other, one ``__future__`` line."""
    here = Path(__file__).resolve().parent.parent  # the dlopt package
    parts = [f"#!/usr/bin/env python3\n# run_candidates.py, written by dlopt {__version__} from dlopt/"
             + ", dlopt/".join(_SOURCES) + ".\n# Needs only numpy and the runtime of each candidate; "
             "`python3 run_candidates.py --help`.\n" + _FUTURE]
    for name in _SOURCES:
        text = (here / name).read_text()
        parts.append(f"\n# ---- dlopt/{name} " + "-" * max(0, 80 - len(name) - 15) + "\n"
                     + text.replace(_FUTURE, "", 1))
    return "".join(parts)


def candidate_entries(report) -> dict:
    """Per shipped candidate: where it is, what it is, its error when built and on the device."""
    entries = {}
    for cand in report.candidates:
        if not cand.artifact_dir:
            continue
        here = (cand.fidelity or {}).get("max_rel_error")
        entries[cand.key] = {"dir": cand.artifact_dir, "backend": cand.backend, "precision": cand.precision,
                             "rel_error_at_build": here,
                             "allowed_rel_error": allowed_error(cand.precision, here)}
    return entries


def write_device_files(staged: Path, ev, report, outputs: list[str]) -> list[str]:
    """Write verify.npz and run_candidates.py into ``staged``; returns their names."""
    feeds, reference, labels = verify_feeds(list(ev.data.feeds), list(ev.reference), list(ev.data.labels))
    chosen = next(c.key for c in report.candidates if c.artifact_dir == ".")
    meta = {"outputs": outputs, "budget": report.budget, "target": report.target.get("name"),
            "timing_shapes": (report.timing or {}).get("shapes"), "top_level": chosen,
            "candidates": candidate_entries(report), "dlopt_version": __version__,
            "evaluation": report.evaluation.get("source")}
    write_verify(staged / VERIFY_FILE, feeds=feeds, reference=reference, labels=labels, meta=meta)
    script = staged / SCRIPT
    script.write_text(script_source())
    script.chmod(0o755)
    return [VERIFY_FILE, SCRIPT]
