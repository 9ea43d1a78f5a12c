"""The report of one compile: baseline, every candidate, the choice, and the passes.

``report.json`` is the contract (``SCHEMA_VERSION``; gates read only it); the
Markdown and terminal tables are renderings of the same dictionary.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.0"


@dataclass
class Measurement:
    """One model measured on one runtime with the same feeds as every other."""

    latency: dict[str, Any] | None  # dlopt.evaluate.Latency.to_dict(); None when not measured
    size_bytes: int
    accuracy: float | None = None  # top-1 on labelled data, when given


@dataclass
class Candidate:
    backend: str
    precision: str
    status: str  # ok | rejected | failed | unavailable | unsupported
    reason: str = ""
    chosen: bool = False
    measurement: Measurement | None = None
    fidelity: dict[str, Any] | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    artifact_files: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass
class Report:
    model: dict[str, Any]
    target: dict[str, Any]
    precision: str
    evaluation: dict[str, Any]
    baseline: Measurement
    passes: list[dict[str, Any]]
    candidates: list[Candidate]
    chosen: str | None
    output_dir: str | None
    dlopt_version: str
    created: str
    notes: list[str] = field(default_factory=list)
    schema_version: str = SCHEMA_VERSION

    # -- derived figures ------------------------------------------------------------
    def chosen_candidate(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    def speedup(self, candidate: Candidate) -> float | None:
        base = (self.baseline.latency or {}).get("p50_ms")
        mine = (candidate.measurement.latency or {}).get("p50_ms") if candidate.measurement else None
        return round(base / mine, 3) if base and mine else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for cand, raw in zip(self.candidates, data["candidates"]):
            raw["speedup"] = self.speedup(cand)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        data = dict(data)
        data["baseline"] = Measurement(**data["baseline"])
        cands = []
        for raw in data["candidates"]:
            raw = {k: v for k, v in raw.items() if k != "speedup"}
            if raw.get("measurement"):
                raw["measurement"] = Measurement(**raw["measurement"])
            cands.append(Candidate(**raw))
        data["candidates"] = cands
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- renderings -----------------------------------------------------------------
    def candidate_rows(self) -> list[list[Any]]:
        rows = [["original", "fp32", _ms(self.baseline.latency, "p50_ms"), _ms(self.baseline.latency, "p99_ms"),
                 "1.00x", _mb(self.baseline.size_bytes), "-", _pct(self.baseline.accuracy), "baseline (ONNX Runtime)"]]
        for c in self.candidates:
            m = c.measurement
            speed = self.speedup(c)
            verdict = ("CHOSEN" + (f": {c.reason}" if c.reason else "")) if c.chosen else (c.reason or c.status)
            rows.append([
                c.backend, c.precision,
                _ms(m.latency, "p50_ms") if m else "-", _ms(m.latency, "p99_ms") if m else "-",
                f"{speed:.2f}x" if speed else "-", _mb(m.size_bytes) if m else "-",
                f"{c.fidelity['max_rel_error']:.2e}" if c.fidelity else "-",
                _pct(m.accuracy if m else None), verdict,
            ])
        return rows

    CANDIDATE_HEADERS = ["backend", "precision", "p50 ms", "p99 ms", "speedup", "size MB",
                         "max rel err", "top-1", "result"]

    def pass_rows(self) -> list[list[Any]]:
        rows = []
        scoped = [("", p) for p in self.passes] + [
            (f"{c.backend}: ", p) for c in self.candidates for p in c.passes
        ]
        for scope, p in scoped:
            changes = ", ".join(f"{k} {v:+d}" for k, v in p["changes"].items()) or "-"
            rows.append([scope + p["name"], "yes" if p["modified"] else "no", f"{p['seconds'] * 1e3:.1f}",
                         f"{sum(p['ops_before'].values())} -> {sum(p['ops_after'].values())}", changes, p["note"] or ""])
        return rows

    PASS_HEADERS = ["pass", "changed", "ms", "nodes", "op changes", "note"]

    def to_markdown(self) -> str:
        from tabulate import tabulate

        chosen = self.chosen_candidate()
        lines = [
            f"# dlopt report: {Path(self.model.get('path') or 'model').name} for `{self.target['name']}`",
            "",
            f"- model sha256: `{self.model.get('sha256', '-')}`",
            f"- inputs: {', '.join(self.model.get('inputs', []))}",
            f"- evaluated on: {self.evaluation.get('source')} ({self.evaluation.get('feeds')} feeds), "
            f"{(self.baseline.latency or {}).get('threads', '-')} threads",
            f"- chosen: **{chosen.key if chosen else 'none'}**"
            + (f", {self.speedup(chosen)}x the original's speed" if chosen and self.speedup(chosen) else ""),
            "",
            "## Candidates",
            "",
            tabulate(self.candidate_rows(), headers=self.CANDIDATE_HEADERS, tablefmt="github"),
            "",
            "## Passes",
            "",
            tabulate(self.pass_rows(), headers=self.PASS_HEADERS, tablefmt="github"),
        ]
        if self.notes:
            lines += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"


def _ms(latency: dict | None, key: str) -> str:
    return f"{latency[key]:.3f}" if latency and latency.get(key) is not None else "not measured"


def _mb(size: int | None) -> str:
    return f"{size / 1e6:.3f}" if size is not None else "-"


def _pct(value: float | None) -> str:
    return f"{value * 100:.2f}%" if value is not None else "-"
