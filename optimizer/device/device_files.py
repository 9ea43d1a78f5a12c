"""The files every output carries for its device: verify.npz and run_candidates.py.

``verify.npz`` holds a few evaluation feeds, the original's outputs on them and, per
shipped candidate, the error it showed when built and the error it may show on the
device (``dlopt.device.device_check``).  ``run_candidates.py`` is ``dlopt/measure/fidelity.py``,
``dlopt/measure/timing.py``, ``dlopt/device/device_guard.py``, each backend's companion module
(``dlopt/targets/ort_plain.py``, ...: how its candidates open with the runtime alone) with their table
by backend name, and ``dlopt/device/device_check.py``, pasted into one script, so the device check that
runs without dlopt is the same code as ``dlopt verify`` and ``dlopt bench``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dlopt import __version__
from dlopt.device.device_check import SCRIPT, VERIFY_FILE, allowed_error, verify_feeds, write_verify
from dlopt.targets import BACKEND_MODULES, get_backend

_SOURCES = ("measure/fidelity.py", "measure/timing.py", "device/device_guard.py", "device/device_check.py")
_FUTURE = "from __future__ import annotations\n"


def _companions() -> tuple[list[tuple[str, Path]], str]:
    """(shown name, file) of each registered backend's companion module, and the PLAIN_RUNTIMES line naming
    its class (or the reason the script does not run that backend) per backend."""
    files, table = [], []
    for name in BACKEND_MODULES:
        backend = get_backend(name)
        if backend is None:
            continue
        if backend.plain_runtime is None:
            table.append(f"{name!r}: {backend.not_run_by_script!r}")
            continue
        module, _, cls = backend.plain_runtime.partition(":")
        files.append(("/".join(module.split(".")) + ".py", Path(importlib.util.find_spec(module).origin)))
        table.append(f"{name!r}: {cls}")
    return files, "PLAIN_RUNTIMES = {" + ", ".join(table) + "}\n"


def script_source() -> str:
    """run_candidates.py: the numpy-only modules, one after the other, one ``__future__`` line."""
    here = Path(__file__).resolve().parent.parent  # the dlopt package
    companions, table = _companions()
    sources = [(f"dlopt/{name}", here / name) for name in _SOURCES]
    sources[-1:-1] = companions
    parts = [f"#!/usr/bin/env python3\n# run_candidates.py, written by dlopt {__version__} from "
             + ", ".join(shown for shown, _ in sources) + ".\n# Needs only numpy and the runtime of each candidate; "
             "`python3 run_candidates.py --help`.\n" + _FUTURE]
    for shown, path in sources:
        if shown.endswith("device_check.py"):
            parts.append("\n# ---- each backend's companion by name (dlopt.targets.BACKEND_MODULES) " + "-" * 7
                         + "\n" + table)
        parts.append(f"\n# ---- {shown} " + "-" * max(0, 80 - len(shown) - 9) + "\n"
                     + path.read_text().replace(_FUTURE, "", 1))
    return "".join(parts)


def candidate_entries(report) -> dict:
    """Per shipped candidate: where it is, what it is, its error when built and on the device."""
    entries = {}
    for cand in report.candidates:
        if not cand.artifact_dir:
            continue
        here = cand.fidelity.max_rel_error if cand.fidelity else None
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
