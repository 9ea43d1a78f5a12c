"""README.md of an output folder: what is in it, how to install, run, verify and time it on the device.

``render_readme`` renders report.json and manifest.json together with the settings each
shipped candidate carries (session_options.json, runtime_config.json, tvm_build.json,
tensorrt_build.json), read from the folder.

Guarantees:

* Every file the "What is inside" table names exists in the folder.
* No latency or speedup is stated that report.json does not hold; for a target that is not
  the machine dlopt ran on, the README says that nothing was timed on the device yet.
* Versions, thread counts, providers and OpenVINO properties in the install lines and code
  are those of the candidates' own settings files.
* Text from the model or the user (model file name, target description, input names) is
  Markdown-escaped in prose; in code it is a Python literal (``repr``) inside a fence longer
  than any run of backticks in the block, so no name can close the block or become HTML.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dlopt.device.device_check import DEVICE_REPORT, SCRIPT, VERIFY_FILE
from dlopt.report.gate import printable
from dlopt.report.data import escape_markdown
from dlopt.report.sections import tuning
from dlopt.targets import get_backend
from dlopt.targets.snippets import dtype as _dtype, feeds_literal as _feeds, version as _version

README = "README.md"
# Files beside the candidates, in the order the README names them, and what each is for.
_OTHER_FILES = {
    "report.md": "how each candidate was built, checked and chosen (also report.html, report.json)",
    VERIFY_FILE: "a few evaluation inputs, the original model's outputs on them and each candidate's allowed error",
    SCRIPT: "verifies and times the candidates with only numpy and the runtime",
    DEVICE_REPORT: "what the last verification and timing on a device found",
    "manifest.json": "input hash, tool versions, options and layout of this folder",
}

@dataclass(frozen=True)
class _Shipped:
    """A candidate in the folder: where it is, its report row and the settings it ships with."""

    where: str  # "." or "bundle/<backend>-<precision>"
    row: dict
    settings: dict

    @property
    def backend(self) -> str:
        return self.row["backend"]

    @property
    def owner(self):
        """Its backend (dlopt.targets.base.Backend), None for one this version does not know."""
        return get_backend(self.backend)

    @property
    def key(self) -> str:
        return f"{self.row['backend']}/{self.row['precision']}"

    def path(self, name: str) -> str:
        return name if self.where == "." else f"{self.where}/{name}"


def render_readme(report: dict, manifest: dict, folder: str | os.PathLike) -> str:
    """README.md of the output in ``folder`` (report.json's and manifest.json's dicts; see the module)."""
    folder = Path(folder)
    shipped = _shipped(report, manifest, folder)
    lines = [*_heading(report, manifest), *_inside(report, shipped, folder), *_install(manifest, shipped),
             *_run(report, shipped), *_verify(shipped)]
    return "\n".join(lines) + "\n"


# -- what is where ----------------------------------------------------------------------------------

def _shipped(report: dict, manifest: dict, folder: Path) -> list[_Shipped]:
    """The top-level candidate, then every bundle/ one in the manifest's order."""
    rows = {f"{c['backend']}/{c['precision']}": c for c in report.get("candidates", [])}
    places = [(_top_key(manifest), ".")]
    places += [(k, v) for k, v in (manifest.get("bundle") or {}).items() if isinstance(v, str)]
    shipped = []
    for key, where in places:
        row = rows.get(key)
        if row is None or not (folder / where).is_dir():
            continue
        files = manifest.get("files", []) if where == "." else row.get("artifact_files", [])
        row = {**row, "artifact_files": [f for f in files if isinstance(f, str) and (folder / where / f).is_file()]}
        shipped.append(_Shipped(where, row, _settings(folder / where, row["backend"])))
    return shipped


def _settings(folder: Path, backend_name: str) -> dict:
    backend = get_backend(backend_name)
    try:
        settings = json.loads((folder / backend.settings_file).read_text()) if backend else {}
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _top_key(manifest: dict) -> str:
    return f"{manifest.get('backend')}/{manifest.get('precision')}"


def _timed(report: dict) -> bool:
    return bool((report.get("baseline") or {}).get("latency"))


def _heading(report: dict, manifest: dict) -> list[str]:
    model = Path(str((report.get("model") or {}).get("path") or "model")).name or "model"
    target = report.get("target") or {}
    name = _text(str(target.get("name", "?")))
    built = f"Built by dlopt {_text(str(manifest.get('dlopt_version')))} on {_text(str(report.get('created')))[:10]}"
    lines = [f"# {_text(model)} for {name}", "",
             f"{_text(str(target.get('description', '')))}. {built}; paths and commands below are relative to this "
             "folder.", ""]
    if _timed(report):
        lines += [f"Measured on the machine that compiled it: {_text(report.get('summary', ''))}.", ""]
    else:
        why = (report.get("verdict") or {}).get("why")
        kept = (f" Every candidate that built ships (bundle/); the top level holds {_text(_top_key(manifest))}"
                + (f", {_text(why)}" if why else "") + "." if manifest.get("bundle") else "")
        lines += [f"**Nothing here was timed on the {name} device yet**: the machine that compiled it could not "
                  f"time it.{kept} Time them there with `dlopt bench . --select` (below).", ""]
    if report.get("chosen") is None:
        lines += ["**The top-level artefact is over the accuracy budget** (see report.md).", ""]
    return lines


def _inside(report: dict, shipped: list[_Shipped], folder: Path) -> list[str]:
    lines = ["## What is inside", "", "| folder | candidate | files | size | status |",
             "| --- | --- | --- | --- | --- |"]
    for s in shipped:
        files = list(s.row["artifact_files"])
        if s.where == "." and "model.onnx" not in files and (folder / "model.onnx").is_file():
            files.append("model.onnx")  # the optimised ONNX the top-level artefact was built from
        size = ((s.row.get("measurement") or {}).get("size_bytes"))
        lines.append(f"| {'top level' if s.where == '.' else _text(s.where)} | {_text(s.key)} | "
                     f"{_text(', '.join(files))} | {_size(size)} | {_status(report, s)} |")
    dropped = [c for c in report.get("candidates", []) if not c.get("artifact_dir")]
    # manifest.json is the one given: publish writes it after this README
    also = [f"{name}: {what}" for name, what in _OTHER_FILES.items()
            if name == "manifest.json" or (folder / name).is_file()]
    lines += ["", *([f"Also here: {'; '.join(also)}."] if also else [])]
    if dropped:
        lines.append(f"Not shipped ({len(dropped)} candidate{'s' if len(dropped) != 1 else ''} rejected, failed or "
                     "unavailable): see report.md.")
    return [*lines, ""]


def _status(report: dict, s: _Shipped) -> str:
    row = s.row
    parts = ["**chosen**"] if row.get("chosen") else []
    fidelity = row.get("fidelity") or {}
    if fidelity.get("max_rel_error") is not None:
        runtime = s.owner.checked_elsewhere if s.owner else ""
        parts.append(f"outputs verified here{runtime} (max rel error {fidelity['max_rel_error']:.1e})")
    else:
        parts.append("outputs not checked here (dlopt could not run it on this machine)")
    tuned = tuning.line(row.get("tuning"))
    if tuned:
        parts.append(_text(tuned))  # "4 of 5 tasks tuned from <database> (64 trials)"
    latency = (row.get("measurement") or {}).get("latency") or {}
    if latency.get("p50_ms") is not None:
        timing = report.get("timing") or {}
        speed = f", {row['speedup']:.2f}x the original's speed" if row.get("speedup") else ""
        parts.append(f"measured here: p50 {latency['p50_ms']:.3f} ms{speed} at {_text(str(timing.get('shape')))}, "
                     f"{timing.get('threads')} threads")
    else:
        engine = s.owner.unbuilt_note if s.owner else ""
        parts.append(f"{engine}not yet measured on the device; run `dlopt bench` there")
    return "; ".join(parts)


def _size(size) -> str:
    if not isinstance(size, int):
        return "-"
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


# -- install ----------------------------------------------------------------------------------------

def _install(manifest: dict, shipped: list[_Shipped]) -> list[str]:
    backends = list(dict.fromkeys(s.backend for s in shipped))
    # dlopt's extras for the runtimes it can load
    extras = list(dict.fromkeys(s.owner.dlopt_extra for s in shipped if s.owner and s.owner.dlopt_extra
                                and _runs_with_dlopt(s)))
    package = f"dlopt[{','.join(extras)}]" if extras else "dlopt"
    version = _version(manifest.get("dlopt_version"))
    lines = ["## Install on the device", "",
             f"- dlopt, for `dlopt.load`, `dlopt run`, `dlopt verify` and `dlopt bench`: "
             f"`pip install \"{package}{'==' + version if version else ''}\"`",
             "- or only numpy and the runtime, enough for the code below and `python3 run_candidates.py`:"]
    for backend in backends:
        mine = [s for s in shipped if s.backend == backend]
        if mine[0].owner is not None:
            lines += [f"  - {line}" for line in mine[0].owner.install_lines(mine, _text)]
    return [*lines, ""]


# -- run --------------------------------------------------------------------------------------------

def _inputs(report: dict) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, timed shape) of each model input."""
    dtypes = {}
    for described in (report.get("model") or {}).get("inputs", []):  # "name: float32[N,3,224,224]"
        name, _, kind = str(described).rpartition(": ")
        dtypes[name] = kind.split("[", 1)[0]
    shapes = (report.get("timing") or {}).get("shapes") or {}
    return [(name, _dtype(dtypes.get(name)), [int(d) for d in shape]) for name, shape in shapes.items()]


def _runs_with_dlopt(s: _Shipped) -> bool:
    return s.owner is not None and s.owner.runs_with_dlopt(s.settings)


def _run(report: dict, shipped: list[_Shipped]) -> list[str]:
    arch = str((report.get("target") or {}).get("arch") or "")
    inputs = _inputs(report)
    feeds = _feeds(inputs)
    lines = ["## Run", ""]
    first = next((s for s in shipped if _runs_with_dlopt(s)), None)
    if first is not None:
        note = "  # the top level is a TensorRT bundle: dlopt runs the others" if first.where != "." else ""
        others = [s.where for s in shipped if s is not first and _runs_with_dlopt(s)]
        also = f"; {', '.join(others[:2])}{', ...' if len(others) > 2 else ''} load the same way" if others else ""
        lines += [f"With dlopt (`dlopt run {first.where} --input data.npz --output preds.npz` runs an .npz with one "
                  f"array per input{also}):",
                  *_code("python", ["import numpy as np", "import dlopt",
                                    f"with dlopt.load({first.where!r}) as r:{note}", f"    outs = r.run({feeds})"])]
    plain = {s.backend: s for s in reversed(shipped)}  # the first folder of each backend
    for backend in dict.fromkeys(s.backend for s in shipped):
        s = plain[backend]
        code = s.owner.plain_code(s, feeds, arch) if s.owner else None
        if code:
            same = sum(o.backend == backend for o in shipped) > 1
            lines += [f"{s.owner.runtime_name or backend} without dlopt, `{s.where}`"
                      + (f" (the other {backend} folders: same code, their path)" if same else "") + ":",
                      *_code("python", code)]
    return [*lines, ""]


# -- verify and benchmark ---------------------------------------------------------------------------

def _verify(shipped: list[_Shipped]) -> list[str]:
    lines = ["## Verify and benchmark", ""]
    for backend in dict.fromkeys(s.backend for s in shipped):
        mine = [s for s in shipped if s.backend == backend]
        if mine[0].owner is not None:
            lines += mine[0].owner.readme_verify(mine, VERIFY_FILE, SCRIPT)
    lines += _code("sh", [
        f"dlopt verify .            # every candidate against {VERIFY_FILE}: the original model's outputs",
        f"dlopt bench . --select    # times the verified ones into {DEVICE_REPORT}; --select puts the fastest "
        "at the top level",
        f"python3 {SCRIPT}   # the same without dlopt: --verify-only, --candidate KEY, --json"])
    return lines


# -- Markdown ---------------------------------------------------------------------------------------

def _text(text: str) -> str:
    """Literal Markdown prose on one line: no HTML, links, table cells or terminal escapes."""
    return printable(escape_markdown(text))


def _code(language: str, code: list[str]) -> list[str]:
    """A fenced block no line of ``code`` can close: the fence is longer than any backtick run in it."""
    longest = max((len(run) for line in code for run in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", *code, fence]
