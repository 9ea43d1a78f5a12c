"""CI gates over ``report.json``: accuracy drop, latency and energy regression, artefact size.

A gate reads only the JSON report (and optionally a previous one to compare
with), never the model.  Each threshold gives one :class:`GateResult` that
passed, failed, or was skipped because the report lacks the figure (latency of
a target that is not this machine, say) — a skip is said, never silent, and a
gate whose every check was skipped fails unless missing figures are allowed.
A report is checked field by field (``dlopt.report.schema``) before any gate reads
it, so a hand-edited or hostile file is refused with one line, not a traceback.
Latency is judged with intervals (``dlopt.report.gate_timing``): a regression fails only when
the limit is crossed and the 95% intervals of the medians separate; with both output
folders at hand the two artefacts are re-timed interleaved here rather than compared
across runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from dlopt.core.errors import ConfigError, GateFailed
from dlopt.report.gate_timing import DEFAULT_RUNS, LatencyComparison, compare_latency, same_evaluation
from dlopt.report.schema import chosen_of as _chosen, load_report, show as _show, validate_report  # noqa: F401
from dlopt.core.toml_file import read_toml

# dlopt.toml [gate] key -> Thresholds field
TOML_KEYS = {
    "max-accuracy-drop": "max_accuracy_drop",
    "max-latency-regression": "max_latency_regression",
    "max-size-mb": "max_size_mb",
    "max-energy-regression": "max_energy_regression",
}


@dataclass(frozen=True)
class Thresholds:
    """Limits a report must meet; ``None`` means "not checked"."""

    max_accuracy_drop: float | None = None  # percentage points
    max_latency_regression: float | None = None  # percent slower (negative: must be faster)
    max_size_mb: float | None = None  # megabytes (1e6 bytes) of the chosen artefact
    max_energy_regression: float | None = None  # percent more joules per inference

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, parse_threshold(f.name, getattr(self, f.name)))

    def merged(self, **overrides: Any) -> "Thresholds":
        """These thresholds with every override that is not None replacing its field."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Thresholds(**values)


def parse_threshold(name: str, value: Any) -> float | None:
    """A number (or for percentages ``"10%"``) as float; ConfigError saying what is wrong."""
    if value is None:
        return None
    option = "--" + name.replace("_", "-")
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and name.endswith("regression"):
        text = text.removesuffix("%").strip()
    number = None
    if not isinstance(text, bool):
        try:
            number = float(text)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
            pass
    hint = "a percentage such as 10 or \"10%\"" if name.endswith("regression") else "a number"
    if number is None:
        raise ConfigError(f"{option} must be {hint}, got {_show(value)}")
    if not math.isfinite(number):
        raise ConfigError(f"{option} must be {hint}, got {_show(value)} (not a finite number)")
    if name in ("max_accuracy_drop", "max_size_mb") and number < 0:
        raise ConfigError(f"{option} must be 0 or more, got {_show(value)}")
    return number


def load_thresholds(toml_path: str | Path) -> Thresholds:
    """Thresholds from the ``[gate]`` table of a dlopt.toml (all None when it has none)."""
    path = Path(toml_path)
    data = read_toml(path, f"gate thresholds from {path}")
    table = data.get("gate", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [gate] must be a table, e.g. [gate] max-accuracy-drop = 0.5")
    unknown = sorted(set(table) - set(TOML_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown [gate] key(s) {', '.join(unknown)}; known: {', '.join(TOML_KEYS)}")
    try:
        return Thresholds(**{TOML_KEYS[k]: v for k, v in table.items()})
    except ConfigError as exc:
        raise ConfigError(f"{path}: [gate] {exc}") from None


# -- reports --------------------------------------------------------------------------------------
def _measure(cand_or_baseline: dict | None, *keys: str) -> Any:
    value = cand_or_baseline
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


# -- gates ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateResult:
    name: str
    measured: float | None
    allowed: float | None
    status: str  # passed | failed | skipped
    detail: str
    unit: str = ""
    warning: str = ""  # something a reader must know although the gate passed (another model's baseline)
    comparison: dict | None = None  # latency: both medians, intervals, ratio, how they were timed

    @property
    def passed(self) -> bool:
        """Skipped gates do not fail the build; their detail says what was missing."""
        return self.status != "failed"

    def describe(self) -> str:
        measured, allowed = format_value(self.measured, self.unit), format_value(self.allowed, self.unit)
        return f"{self.name}: measured {measured}, allowed {allowed}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    sign = "+" if unit == "%" and value > 0 else ""
    return f"{sign}{value:g}{'' if unit == '%' else ' '}{unit}".rstrip()


def _gate(name: str, measured: float | None, allowed: float, unit: str, detail: str, why_missing: str) -> GateResult:
    if measured is None:
        return GateResult(name, None, allowed, "skipped", why_missing, unit)
    measured = round(measured, 6 if unit == "MB" else 4)  # report figures' precision: no failing on float noise
    return GateResult(name, measured, allowed, "passed" if measured <= allowed else "failed", detail, unit)


def _percent(mine: float | None, reference: float | None) -> float | None:
    return (mine / reference - 1.0) * 100.0 if mine and reference else None


@dataclass(frozen=True)
class _Sides:
    """The chosen candidate and what it is compared with: the original, or a baseline report's choice."""

    report: dict
    cand: dict
    ref_measurement: dict | None  # the original's measurement, or the baseline's chosen candidate's
    ref_score: dict | None  # None without a baseline: the candidate's own drop_pp is already relative
    ref_name: str
    with_baseline: bool
    latency: LatencyComparison | None = None

    @property
    def key(self) -> str:
        return self.report["chosen"]


# Each gate: sides -> (measured or None, detail, why it is missing)
def _accuracy(s: _Sides) -> tuple[float | None, str, str]:
    mine = s.cand.get("score") or {}
    detail = f"{s.key} {mine.get('metric', 'score')} vs {s.ref_name}"
    if not mine:
        return None, detail, f"{s.key} has no accuracy score"
    if not s.with_baseline:
        return mine["drop_pp"], detail, ""
    ref = s.ref_score or {}
    if not ref:
        return None, detail, f"{s.ref_name} has no accuracy score"
    if mine["metric"] != ref["metric"]:
        return None, detail, f"metrics differ ({mine['metric']} here, {ref['metric']} in the baseline)"
    return (ref["value"] - mine["value"]) * 100.0, detail, ""


def _latency(s: _Sides) -> tuple[float | None, str, str]:
    mine = _measure(s.cand, "measurement", "latency", "p50_ms")
    missing = (f"latency not measured for {s.key} (target {s.report['target'].get('name')} is not this machine)"
               if not mine else f"latency of {s.ref_name} not measured")
    return (s.latency.percent if s.latency else None), (s.latency.describe() if s.latency else ""), missing


def _latency_gate(s: _Sides, allowed: float) -> GateResult:
    """Crossing the limit fails only with separated intervals (``LatencyComparison.judge``)."""
    measured, detail, missing = _latency(s)
    if s.latency is None:
        return GateResult("latency-regression", None, allowed, "skipped", missing, "%")
    status, why = s.latency.judge(allowed)
    return GateResult("latency-regression", measured, allowed, status, f"{detail}; {why}", "%",
                      comparison=s.latency.to_dict())


def _size(s: _Sides) -> tuple[float | None, str, str]:
    size = _measure(s.cand, "measurement", "size_bytes")
    return (size / 1e6 if size is not None else None), f"{s.key} artefact {size} bytes", f"{s.key} has no size"


def _energy(s: _Sides) -> tuple[float | None, str, str]:
    mine = _measure(s.cand, "measurement", "energy") or {}
    ref = _measure(s.ref_measurement, "energy") or {}
    detail = (f"{mine.get('joules_per_inference')} J vs {ref.get('joules_per_inference')} J per inference "
              f"({mine.get('kind')}, {s.ref_name})")
    if not mine or not ref:
        return None, detail, f"no energy figure for {s.key if not mine else s.ref_name}"
    if mine["kind"] != ref["kind"]:
        return None, detail, f"cannot compare {mine['kind']} energy with {ref['kind']} energy"
    return _percent(mine["joules_per_inference"], ref["joules_per_inference"]), detail, ""


GATES = {  # Thresholds field -> (gate name, unit, measure)
    "max_accuracy_drop": ("accuracy-drop", "pp", _accuracy),
    "max_latency_regression": ("latency-regression", "%", _latency),
    "max_size_mb": ("size", "MB", _size),
    "max_energy_regression": ("energy-regression", "%", _energy),
}


def check(report: dict, thresholds: Thresholds, baseline: dict | None = None, *, allow_missing: bool = False,
          allow_different_eval: bool = False, folders: tuple[Path | None, Path | None] = (None, None),
          runs: int = DEFAULT_RUNS) -> list[GateResult]:
    """One result per threshold that is set, after "candidate" (was anything chosen at all) and, with a
    baseline, "baseline" (what is compared with what).  When every gate was skipped, a failed "coverage"
    result says so unless ``allow_missing``: a gate that checked nothing must not pass a build.

    ``folders`` are the output folders of the report and the baseline, where they are at hand: with both,
    a latency threshold re-times the two artefacts interleaved here (``runs`` each), and evaluation data
    at different paths is compared by content."""
    validate_report(report)
    compared = []
    if baseline is not None:
        validate_report(baseline, "the baseline report")
        compared = [_baseline_result(report, baseline, allow_different_eval, folders)]
    limits = {name: getattr(thresholds, name) for name in GATES if getattr(thresholds, name) is not None}
    cand = _chosen(report)
    if cand is None:
        return [GateResult("candidate", None, None, "failed", "no candidate was chosen: every candidate failed or "
                           "missed the accuracy budget (see the report's candidates)")] + compared + [
            GateResult(GATES[n][0], None, v, "skipped", "no chosen candidate to measure", GATES[n][1])
            for n, v in limits.items()]
    ref = (_chosen(baseline) or {}) if baseline is not None else None
    latency = (compare_latency(report, cand, baseline, ref, folders=folders, runs=runs)
               if "max_latency_regression" in limits else None)
    if baseline is None:
        sides = _Sides(report, cand, report["baseline"], None, "the original model", False, latency)
    else:
        name = (f"the baseline report's {baseline['chosen']}" if ref
                else "the baseline report (it chose no candidate)")
        sides = _Sides(report, cand, ref.get("measurement"), ref.get("score"), name, True, latency)
    gates = []
    for field_name, allowed in limits.items():
        gate_name, unit, measure = GATES[field_name]
        if field_name == "max_latency_regression":
            gates.append(_latency_gate(sides, allowed))
            continue
        measured, detail, missing = measure(sides)
        gates.append(_gate(gate_name, measured, allowed, unit, detail, missing))
    results = [GateResult("candidate", None, None, "passed", f"{report['chosen']} was chosen"), *compared, *gates]
    if gates and not allow_missing and all(r.status == "skipped" for r in gates):
        why = "; ".join(f"{r.name} skipped: {r.detail}" for r in gates)
        results.append(GateResult("coverage", None, None, "failed", f"nothing was checked ({why}); pass "
                                  "--allow-missing to accept a report without these figures"))
    return results


def _evaluation(report: dict) -> tuple[Any, Any]:
    return _measure(report, "evaluation", "source"), _measure(report, "evaluation", "feeds")


def _baseline_result(report: dict, baseline: dict, allow_different_eval: bool,
                     folders: tuple[Path | None, Path | None] = (None, None)) -> GateResult:
    """Refuse a baseline whose figures are not comparable; say when it is of another model (the usual case).
    Evaluation data at another path counts as the same when its content is (``gate_timing.same_evaluation``)."""
    if baseline["target"]["name"] != report["target"]["name"]:
        raise ConfigError(f"the baseline report is for target {_show(baseline['target']['name'])}, this one for "
                          f"{_show(report['target']['name'])}; compare reports of the same target")
    differences, same_data = [], None
    if _evaluation(baseline) != _evaluation(report):
        same_data = same_evaluation(report, baseline, folders)
    if _evaluation(baseline) != _evaluation(report) and same_data is None:
        (source, feeds), (ref_source, ref_feeds) = _evaluation(report), _evaluation(baseline)
        differences.append(f"this one was evaluated on {_show(source)} ({feeds} feeds), the baseline on "
                           f"{_show(ref_source)} ({ref_feeds} feeds)")
    metric, ref_metric = report["budget"].get("metric"), baseline["budget"].get("metric")
    if metric != ref_metric:
        differences.append(f"this one's budget metric is {_show(metric)}, the baseline's {_show(ref_metric)}")
    if differences and not allow_different_eval:
        raise ConfigError(f"the baseline report is not comparable: {'; '.join(differences)}; evaluate both on the "
                          "same data, or pass --allow-different-eval to compare them anyway")
    warnings = [f"compared although {d} (--allow-different-eval)" for d in differences]
    sha, ref_sha = _measure(report, "model", "sha256"), _measure(baseline, "model", "sha256")
    if sha and ref_sha and sha != ref_sha:
        warnings.insert(0, f"the baseline report is of another model (sha256 {ref_sha[:12]}, this one "
                           f"{sha[:12]}): the gates compare this model with that one")
    detail = (f"compared with the baseline report's {baseline['chosen']}" if baseline["chosen"]
              else "the baseline report chose no candidate: nothing to compare with")
    if same_data:
        detail += f"; {same_data}"
    return GateResult("baseline", None, None, "passed", detail, warning="; ".join(warnings))


def enforce(results: list[GateResult]) -> None:
    """Raise GateFailed naming every failed gate with its measured and allowed figures."""
    failed = [r for r in results if not r.passed]
    if failed:
        raise GateFailed("gate failed: " + "; ".join(
            r.describe() if r.measured is not None else f"{r.name}: {printable(r.detail)}" for r in failed))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` for a terminal: details quote report strings, which must not carry escape sequences."""
    return _CONTROL.sub("?", text)


# -- renderings -----------------------------------------------------------------------------------
# Characters XML 1.0 cannot hold at all; report strings (target, metric names) may carry them.
_NOT_XML = re.compile(r"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def to_junit(results: list[GateResult]) -> str:
    """JUnit XML: one testsuite "dlopt gate", one testcase per gate (CI systems show it as tests)."""
    import xml.etree.ElementTree as ET

    def xml(text: str) -> str:
        return _NOT_XML.sub("\ufffd", text)

    failures = sum(r.status == "failed" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    root = ET.Element("testsuites", name="dlopt", tests=str(len(results)), failures=str(failures))
    suite = ET.SubElement(root, "testsuite", name="dlopt gate", tests=str(len(results)), failures=str(failures),
                          errors="0", skipped=str(skipped), time="0")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="dlopt.gate", name=r.name, time="0")
        if r.status == "failed":
            message = (f"measured {format_value(r.measured, r.unit)}, allowed {format_value(r.allowed, r.unit)}"
                       if r.measured is not None else r.detail)
            ET.SubElement(case, "failure", message=xml(message), type="GateFailed").text = xml(r.detail)
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message=xml(r.detail))
        else:
            ET.SubElement(case, "system-out").text = xml(r.detail)
        if r.warning:
            ET.SubElement(case, "system-err").text = xml("warning: " + r.warning)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_ICONS = {"passed": "✅ passed", "failed": "❌ failed", "skipped": "⏭️ skipped"}


def to_markdown(results: list[GateResult], report: dict) -> str:
    """A pull-request comment: verdict, what was gated, one table row per gate.

    Every string that came from a report (model path, target, metric names) is escaped: the
    comment is posted where ``@`` pings people and HTML renders."""
    ok = all(r.passed for r in results)
    model = Path(_measure(report, "model", "path") or "model").name or "model"
    lines = [f"### dlopt gate {'✅ passed' if ok else '❌ failed'}: {_cell(model)} for "
             f"{_cell(str(report['target'].get('name')))}, chosen {_cell(str(report['chosen']))}", "",
             *[f"> ⚠️ warning: {_cell(r.warning)}" for r in results if r.warning],
             *([""] if any(r.warning for r in results) else []),
             "| gate | measured | allowed | status | detail |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        measured, allowed = format_value(r.measured, r.unit), format_value(r.allowed, r.unit)
        lines.append(f"| {r.name} | {measured} | {allowed} | {_ICONS[r.status]} | {_cell(r.detail)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    from dlopt.report.data import escape_markdown  # the one Markdown escaper (report.md uses it too)

    return printable(escape_markdown(text))  # escape_markdown keeps control characters such as ESC
