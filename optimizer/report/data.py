"""The report of one compile: baseline, every candidate, the choice, and the passes.

``report.json`` is the contract (``SCHEMA_VERSION``; gates read only it); the
Markdown and terminal tables are renderings of the same dictionary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dlopt.measure.budget import Score
from dlopt.measure.fidelity import Fidelity
from dlopt.report import sections
from dlopt.report.sections import pruning
from dlopt.report.sections.base import escape_markdown, markdown_table
from dlopt.targets.c.figures import McuFigures
from dlopt.targets.tvm.tuning_db import TuningApplied

SCHEMA_VERSION = "1.6"


@dataclass
class Measurement:
    """One model measured on one runtime with the same feeds as every other."""

    latency: dict[str, Any] | None  # dlopt.measure.timing.Timing.to_dict(); None when not measured
    size_bytes: int
    accuracy: float | None = None  # top-1 on labelled data, when given
    energy: dict[str, Any] | None = None  # dlopt.measure.energy: joules_per_inference, kind, source, watts


@dataclass
class Candidate:
    backend: str
    precision: str
    status: str  # ok | rejected | failed | unavailable | unsupported
    reason: str = ""
    ran_as: str | None = None  # the precision the runtime executed, when it reports one
    chosen: bool = False
    measurement: Measurement | None = None
    fidelity: Fidelity | None = None
    score: Score | None = None  # as report.json keeps it (Score.rounded())
    float_nodes: list[dict[str, Any]] = field(default_factory=list)  # mixed precision: nodes kept in float
    quantiser: str | None = None  # who quantised it, with version ("nncf 3.4.0", "onnxruntime 1.32.0 static")
    tuning: TuningApplied | None = None  # TVM: the tuning database a build applied
    mcu: McuFigures | None = None  # C backend: arena, liveness bound, flash/RAM, sections, qemu run
    passes: list[dict[str, Any]] = field(default_factory=list)
    artifact_files: list[str] = field(default_factory=list)
    artifact_dir: str | None = None  # where its files are in the output folder ("." = top level)

    def __post_init__(self) -> None:
        # a record read from report.json's dictionaries (Report.from_dict; a test's) holds the typed results too
        for name, kind in _RESULTS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind.from_dict(value) if value else None)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"

    def results(self) -> dict[str, Any]:
        """The typed results as report.json writes them."""
        return {name: None if (value := getattr(self, name)) is None else value.to_dict() for name in _RESULTS}


_RESULTS = {"fidelity": Fidelity, "score": Score, "tuning": TuningApplied, "mcu": McuFigures}


@dataclass
class Report:
    model: dict[str, Any]
    target: dict[str, Any]
    precision: str
    evaluation: dict[str, Any]
    baseline: Measurement
    budget: dict[str, Any]  # {"metric", "original", "max_drop_pp"}
    passes: list[dict[str, Any]]
    candidates: list[Candidate]
    chosen: str | None
    output_dir: str | None
    dlopt_version: str
    created: str
    calibration: dict[str, Any] | None = None  # dlopt.flow.ranges.RangeStats.to_dict() + source
    search: dict[str, Any] | None = None  # mixed-precision search summary
    notes: list[str] = field(default_factory=list)
    # the declared timing shape, threads, runs and noise (dlopt.core.shapes / dlopt.measure.timing)
    timing: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None  # why the chosen one, ties, faster than the original?
    summary: str = ""  # the one honest line: what shipped, how much faster, at what cost
    schema_version: str = SCHEMA_VERSION
    # the fields of registered sections (dlopt.report.sections) that have no field above; written at the top level
    extra_sections: dict[str, Any] = field(default_factory=dict)

    # -- derived figures ------------------------------------------------------------
    def chosen_candidate(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    def speedup(self, candidate: Candidate) -> float | None:
        base = (self.baseline.latency or {}).get("p50_ms")
        mine = (candidate.measurement.latency or {}).get("p50_ms") if candidate.measurement else None
        return round(base / mine, 3) if base and mine else None

    def pruning(self) -> str | None:
        """What ``--prune`` reached (dlopt.report.sections.pruning); None when no pruning ran."""
        return pruning.text(self.passes)

    def section(self, key: str) -> Any:
        """The value of a section's top-level field, a field of its own or one in ``extra_sections``."""
        return getattr(self, key) if key in _FIELDS else self.extra_sections.get(key)

    @classmethod
    def with_sections(cls, values: dict[str, Any], **known: Any) -> "Report":
        """A report from its fields and the sections' values (dlopt.report.sections.collect)."""
        extra = {k: v for k, v in values.items() if k not in _FIELDS}
        return cls(**known, **{k: v for k, v in values.items() if k in _FIELDS}, extra_sections=extra)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for cand, raw in zip(self.candidates, data["candidates"]):
            raw.update(cand.results())  # in place: the keys keep their order
            raw["speedup"] = self.speedup(cand)
        data.update(data.pop("extra_sections"))
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """Read a 1.x report; fields a later minor version added are ignored (docs/report-schema.md)."""
        extra = {s.key: data[s.key] for s in sections.SECTIONS if s.key and s.key not in _FIELDS and s.key in data}
        data = {**_known(cls, data), "extra_sections": extra}
        data["baseline"] = Measurement(**_known(Measurement, data["baseline"]))
        cands = []
        for raw in data["candidates"]:
            raw = _known(Candidate, raw)  # also drops the derived "speedup"
            if raw.get("measurement"):
                raw["measurement"] = Measurement(**_known(Measurement, raw["measurement"]))
            cands.append(Candidate(**raw))
        data["candidates"] = cands
        return cls(**data)

    # -- renderings -----------------------------------------------------------------
    def candidate_rows(self) -> list[list[Any]]:
        rows = [["original", "fp32", _ms(self.baseline.latency, "p50_ms"), _ms(self.baseline.latency, "p99_ms"),
                 "1.00x", _mb(self.baseline.size_bytes), "-", "0.00", "baseline (ONNX Runtime)"]]
        pruned = self.pruning()
        for c in self.candidates:
            m = c.measurement
            speed = self.speedup(c)
            verdict = ("CHOSEN" + (f": {c.reason}" if c.reason else "")) if c.chosen else (c.reason or c.status)
            verdict += "".join(f"; {fact}" for fact in sections.candidate_facts(self, c)) + (
                f"; {pruned}" if c.chosen and pruned else "")
            rows.append([
                c.backend, c.precision + (f" (ran {c.ran_as})" if c.ran_as and c.ran_as != c.precision else ""),
                _ms(m.latency, "p50_ms") if m else "-", _ms(m.latency, "p99_ms") if m else "-",
                f"{speed:.2f}x" if speed else "-", _mb(m.size_bytes) if m else "-",
                f"{c.fidelity.max_rel_error:.2e}" if c.fidelity else "-",
                f"{c.score.drop_pp:.2f}" if c.score else "-", verdict,
            ])
        return rows

    CANDIDATE_HEADERS = ["backend", "precision", "p50 ms", "p99 ms", "speedup", "size MB",
                         "max rel err", "drop pp", "result"]

    def pass_rows(self) -> list[list[Any]]:
        rows = []
        scoped = [("", p) for p in self.passes] + [
            (f"{c.key}: ", p) for c in self.candidates for p in c.passes
        ]
        for scope, p in scoped:
            changes = ", ".join(f"{k} {v:+d}" for k, v in p["changes"].items()) or "-"
            rows.append([scope + p["name"], "yes" if p["modified"] else "no", f"{p['seconds'] * 1e3:.1f}",
                         f"{sum(p['ops_before'].values())} -> {sum(p['ops_after'].values())}", changes, p["note"] or ""])
        return rows

    PASS_HEADERS = ["pass", "changed", "ms", "nodes", "op changes", "note"]

    def to_markdown(self, device: dict | None = None) -> str:
        """report.md; every string that came from the model, its paths or the config is escaped.

        ``device``: a device_report.json written by ``dlopt bench`` or run_candidates.py."""
        esc, table = escape_markdown, markdown_table
        chosen = self.chosen_candidate()
        lines = [
            f"# dlopt report: {esc(Path(self.model.get('path') or 'model').name)} "
            f"for {esc(str(self.target['name']))}",
            "",
            *sections.markdown(self, sections.HEAD),
            f"- model sha256: {esc(str(self.model.get('sha256', '-')))}",
            f"- inputs: {esc(', '.join(self.model.get('inputs', [])))}",
            f"- evaluated on: {esc(str(self.evaluation.get('source')))} ({self.evaluation.get('feeds')} feeds), "
            f"{(self.baseline.latency or {}).get('threads', '-')} threads",
            f"- accuracy budget: {esc(str(self.budget['metric']))} may drop at most {self.budget['max_drop_pp']} "
            f"points (original: {self.budget['original'] * 100:.2f}%)",
            f"- chosen: **{esc(chosen.key) if chosen else 'none'}**"
            + (f", {self.speedup(chosen)}x the original's speed" if chosen and self.speedup(chosen) else ""),
            *[f"- {esc(line)}" for _, line in sections.facts(self)],
            "",
            "## Candidates",
            "",
            table(self.candidate_rows(), self.CANDIDATE_HEADERS),
            "",
            *sections.markdown(self, sections.BODY),
            "## Passes",
            "",
            table(self.pass_rows(), self.PASS_HEADERS),
        ]
        if device:
            lines += ["", "## Measured on the device", "", esc(device_heading(device)), "",
                      table(device_rows(device), DEVICE_HEADERS), "", esc(str(device.get("why") or ""))]
        lines += sections.markdown(self, sections.END)
        return "\n".join(lines) + "\n"


DEVICE_HEADERS = ["candidate", "ran as", "verified", "rel. error (allowed)", "p50 ms (95% CI)", "runs", "note"]


def device_heading(device: dict) -> str:
    host, target = device.get("host") or {}, device.get("target") or {}
    line = (f"{device.get('tool', '?')} on {host.get('machine', '?')} ({host.get('processor') or '?'}, "
            f"{host.get('cores', '?')} cores) at {device.get('created', '?')}")
    if device.get("this_machine_matches_target_arch") is False:
        line += (f"; this machine is not the {target.get('name')} device ({target.get('arch')}): its native "
                 f"timings are this machine's, not the device's")
    return line


def device_rows(device: dict) -> list[list[Any]]:
    """The candidates of a device report as table rows (emulated timings marked as such)."""
    rows = []
    for c in device.get("candidates") or []:
        lat = c.get("latency") or {}
        err, allowed = c.get("rel_error"), c.get("allowed_rel_error")
        state = {True: "yes", False: "FAILED", None: "skipped"}.get(c.get("verified"), "?")
        timed = (f"{lat['p50_ms']:.3f} ({lat['ci_low_ms']:.3f}-{lat['ci_high_ms']:.3f})"
                 if {"p50_ms", "ci_low_ms", "ci_high_ms"} <= lat.keys() else "-")
        if timed != "-" and "emulation" in str(c.get("ran_as")):
            timed += " emulated, not a device figure"
        rows.append([c.get("key"), c.get("ran_as") or "-", state,
                     "-" if err is None else f"{err:.2e} ({allowed:.1e})" if allowed else f"{err:.2e}",
                     timed, lat.get("runs", "-"), c.get("reason") or ""])
    return rows


_FIELDS = {f.name for f in fields(Report)} - {"extra_sections"}


def _known(cls, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def _ms(latency: dict | None, key: str) -> str:
    return f"{latency[key]:.3f}" if latency and latency.get(key) is not None else "not measured"


def _mb(size: int | None) -> str:
    return f"{size / 1e6:.3f}" if size is not None else "-"
