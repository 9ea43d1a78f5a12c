"""What a report.json must look like before anything reads it: the fields the gates use, checked.

``load_report`` parses with limits (no integer over 40 digits, no nesting that
exhausts the stack, regular files only) and ``validate_report`` walks ``SCHEMA``,
so a hand-edited or hostile file is refused with one line naming the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from dlopt.core.errors import ConfigError, first_line
from dlopt.report import sections

SCHEMA_MAJOR = "1"
REQUIRED_KEYS = ("schema_version", "model", "target", "baseline", "budget", "candidates", "chosen")


class _Invalid(Exception):
    """A report field of the wrong type or value: where it is, what it must be, what it is."""


_HEX64 = re.compile(r"[0-9a-f]{64}")
_KINDS = {  # JSON kind -> (test, what a value must be)
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "sha256": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "a hex SHA-256"),
    "number": (lambda v: _finite(v), "a finite number"),
    "amount": (lambda v: _finite(v) and v >= 0, "a finite number, 0 or more"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
              "an integer between 0 and 2**63"),
}


def _finite(value: Any) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _show(value: Any) -> str:
    """``value`` in a message: short, on one line, never the whole of a huge or hostile value."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)  # null, true, NaN, -Infinity: as JSON spells them
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return {dict: "an object", list: "an array"}.get(type(value), f"a {type(value).__name__}")


# The fields the gates read, with their types in docs/report-schema.md: key -> kind ("?": or
# null, or missing) or (kind, the fields of each object in it).  The report's sections
# (dlopt.report.sections) add theirs: top-level fields, and fields of a measurement (energy).
_MEASUREMENT = {
    "latency": ("object?", {"p50_ms": "amount?", "p90_ms": "amount?", "p99_ms": "amount?", "mean_ms": "amount?"}),
    "size_bytes": "count",
}


def _schema() -> dict[str, Any]:
    measurement = {**_MEASUREMENT, **sections.measurement_schema()}
    return {
        "schema_version": "string",
        "model": ("object", {"path": "string?", "sha256": "sha256?"}),
        "target": ("object", {"name": "string"}),
        "budget": ("object", {"metric": "string?"}),
        "evaluation": ("object?", {"source": "string?", "feeds": "count?", "sha256": "sha256?"}),
        "baseline": ("object", measurement),
        "candidates": ("array", {"backend": "string", "precision": "string", "measurement": ("object?", measurement),
                                 "score": ("object?", {"metric": "string", "value": "number", "drop_pp": "number"})}),
        "chosen": "string?",
        **sections.schema(),
    }


def _check_fields(obj: dict, schema: dict, where: str = "") -> None:
    for key, spec in schema.items():
        kind, inner = spec if isinstance(spec, tuple) else (spec, None)
        path = f"{where}.{key}" if where else key
        value = obj.get(key)
        if value is None and kind.endswith("?"):
            continue
        test, must = _KINDS[kind.rstrip("?")]
        if not test(value):
            got = "nothing" if key not in obj else _show(value)
            extra = " (not a finite number)" if isinstance(value, float) and not math.isfinite(value) else ""
            null = ("," in must and ", or null" or " or null") if kind.endswith("?") else ""
            raise _Invalid(f"{path} must be {must}{null}, got {got}{extra}")
        for item_path, item in ([(f"{path}[{i}]", v) for i, v in enumerate(value)] if kind.rstrip("?") == "array"
                                else [(path, value)] if inner else []):
            if not isinstance(item, dict):
                raise _Invalid(f"{item_path} must be an object, got {_show(item)}")
            _check_fields(item, inner, item_path)


def validate_report(data: Any, what: str = "report") -> dict[str, Any]:
    """``data`` if it is a dlopt report this version can read; else ConfigError saying what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is not a dlopt report (a JSON object is expected, got {_show(data)})")
    if data.get("task") == "text-generation":
        raise ConfigError(f"{what} is the report of a --task text-generation compile: `dlopt gate` does not read its "
                          "perplexity figures yet (report.json's candidates hold ppl_increase_pct for a script)")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ConfigError(f"{what} is not a dlopt report (missing {', '.join(missing)})")
    version = data["schema_version"]
    if not isinstance(version, str) or version.split(".")[0] != SCHEMA_MAJOR:
        raise ConfigError(f"{what} is not a dlopt report this version can read (schema {_show(version)}; "
                          f"reads {SCHEMA_MAJOR}.x): regenerate it with this dlopt")
    try:
        _check_fields(data, _schema())
    except _Invalid as exc:
        raise ConfigError(f"{what} is not a dlopt report: {exc}") from None
    if data["chosen"] is not None and chosen_of(data) is None:
        raise ConfigError(f"{what} is not a dlopt report: chosen {_show(data['chosen'])} is not among its candidates")
    return data


def load_report(path: str | Path, what: str | None = None) -> dict[str, Any]:
    path = Path(path)
    what = what or str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ConfigError(f"{what} is not a regular file")
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=_parse_int)
    except FileNotFoundError:
        raise ConfigError(f"{what}: file not found") from None
    except RecursionError:
        raise ConfigError(f"{what} is not a dlopt report (its JSON is nested too deeply)") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8, an integer over 4300 digits
        raise ConfigError(f"{what} is not a dlopt report (not readable JSON: {first_line(exc)})") from None
    return validate_report(data, what)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 40:  # no figure in a report comes near; int() of 4300+ digits raises anyway
        raise ValueError(f"it holds an integer of {len(text.lstrip('-'))} digits")
    return int(text)



def chosen_of(report: dict) -> dict | None:
    """The candidate a (validated) report chose, or None."""
    return next((c for c in report["candidates"] if f"{c['backend']}/{c['precision']}" == report["chosen"]), None)


show = _show  # one line, control characters escaped, cut short: how a report's value is quoted
