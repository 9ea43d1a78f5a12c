"""The ONNX backend test suite against each of dlopt's ONNX backends (``dlopt.onnx_backend.*``).

Every case runs in a worker process under a supervisor: a case that passes its
``--timeout`` or takes the worker down (a runtime's segfault or abort) is recorded
as a failure with that cause, and a fresh worker takes the next case.  Failures are
classified by the first line of their exception, normalised (numbers, quoted names
and paths elided), and the most common causes go into the Markdown table.

    python bench/conformance.py --backends ort,openvino --json /tmp/conf/ort-ov.json
    python bench/conformance.py --backends tvm --json /tmp/conf/tvm.json --resume
    python bench/conformance.py --report /tmp/conf/ort-ov.json /tmp/conf/tvm.json --doc docs/conformance.md
    python bench/conformance.py --backends cpu,raw-ort,raw-openvino,raw-tvm --every 3 --json /tmp/conf/third.json

``raw-ort``, ``raw-openvino`` and ``raw-tvm`` are plain wrappers around the engines without
dlopt (bench/conformance_raw.py), to measure the raw-engine figures on the same machine.
``--kinds`` picks the suite's classes (node, simple, pytorch-converted, pytorch-operator;
"real" needs model downloads and is not offered).  The JSON is rewritten every few cases,
so ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import multiprocessing
import os
import re
import sys
import time
import unittest
import warnings
from pathlib import Path

# Node-case pass counts of plain wrappers around the engines, onnx 1.23.2 (issue 17).
RAW_ENGINES = {"ort": 1588, "openvino": 1490, "tvm": 770, "cpu": 1718}
RAW_NOTE = {"cpu": "union of the three"}
KINDS = {"node": "OnnxBackendNodeModelTest", "simple": "OnnxBackendSimpleModelTest",
         "pytorch-converted": "OnnxBackendPyTorchConvertedModelTest",
         "pytorch-operator": "OnnxBackendPyTorchOperatorModelTest"}
SAVE_EVERY = 20
DEFAULT_DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"


class _Adapter:
    """The backend module with the bench's thread count, keeping the last prepared rep."""

    def __init__(self, module, threads: int, lift: bool = True) -> None:
        self.module, self.threads, self.lift, self.last = module, threads, lift, None

    def supports_device(self, device: str) -> bool:
        return device == "CPU" if self.module is None else self.module.supports_device(device)

    def is_compatible(self, model, device: str = "CPU", **kwargs) -> bool:
        return self.module.is_compatible(model, device, **kwargs)

    def prepare(self, model, device: str = "CPU", **kwargs):
        if not getattr(self.module, "__name__", "").startswith("dlopt."):  # a raw wrapper takes no options
            self.last = self.module.prepare(model, device, **kwargs)
            return self.last
        self.last = self.module.prepare(model, device, threads=self.threads, lift=self.lift, **kwargs)
        return self.last


def _suite(backend) -> dict[str, tuple[str, type]]:
    """case name -> (kind, TestCase class), CPU cases only."""
    import onnx.backend.test

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suite = onnx.backend.test.BackendTest(backend, __name__)
    cases = {}
    for category, cls in suite.test_cases.items():
        kind = next((k for k, v in KINDS.items() if v == category), None)
        if kind is None:
            continue
        for name in unittest.TestLoader().getTestCaseNames(cls):
            if name.endswith("_cpu"):
                cases[name] = (kind, cls)
    return cases


class _Result(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.outcome: tuple[str, str] = ("pass", "")

    def addError(self, test, err) -> None:  # noqa: N802 - unittest's name
        self.outcome = ("error", f"{err[0].__name__}: {err[1]}")

    def addFailure(self, test, err) -> None:  # noqa: N802
        self.outcome = ("fail", str(err[1]))

    def addSkip(self, test, reason) -> None:  # noqa: N802
        self.outcome = ("skip", str(reason))


def _worker(backend_name: str, threads: int, lift: bool, conn) -> None:
    import importlib
    import logging

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    if backend_name.startswith("raw-"):
        from conformance_raw import raw_backend

        module = raw_backend(backend_name)
    else:
        module = importlib.import_module(f"dlopt.onnx_backend.{backend_name}")
    adapter = _Adapter(module, threads, lift)
    cases = _suite(adapter)
    conn.send("ready")
    while True:
        name = conn.recv()
        if name is None:
            return
        adapter.last = None
        result = _Result()
        start = time.perf_counter()
        cases[name][1](name).run(result)
        status, message = result.outcome
        info = {"status": status, "message": message[:2000], "seconds": round(time.perf_counter() - start, 3)}
        engine = getattr(adapter.last, "engine", None)
        if getattr(engine, "chosen", None):
            info["ran_on"] = engine.chosen
        if getattr(engine, "lifted", None):
            info["lifted"] = engine.lifted
        if hasattr(adapter.last, "close"):
            adapter.last.close()
        conn.send(info)


class Supervisor:
    """One worker at a time; restarted after a timeout or a crash."""

    def __init__(self, backend: str, threads: int, timeout: float, lift: bool = True) -> None:
        self.backend, self.threads, self.timeout, self.lift = backend, threads, timeout, lift
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = self.conn = None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(self.backend, self.threads, self.lift, child), daemon=True)
        self.proc.start()
        child.close()
        if not parent.poll(300) or parent.recv() != "ready":
            raise RuntimeError(f"the {self.backend} worker did not start")
        self.conn = parent

    def _stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(10)
        self.proc = self.conn = None

    def run(self, name: str) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        start = time.perf_counter()
        self.conn.send(name)
        try:
            if self.conn.poll(self.timeout):
                return self.conn.recv()
            cause = f"timeout: no result in {self.timeout:g} s"
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            cause = f"worker crashed ({'signal ' + str(-code) if code and code < 0 else 'exit code ' + str(code)})"
        self._stop()
        return {"status": "crash", "message": cause, "seconds": round(time.perf_counter() - start, 3)}

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
                self.proc.join(10)
            except (OSError, BrokenPipeError):
                pass
        self._stop()


_OV_NOISE = ("Exception from", "Check '", "Details:", "Exception from src")
_DTYPE = re.compile(r"dtype\('?([\w]+)'?\)")


def cause(info: dict) -> str:
    """A failure's cause, normalised so that equal causes of different cases count together."""
    status, message = info["status"], info.get("message", "")
    if status == "skip":
        return f"skipped: {message.splitlines()[0] if message else 'no reason'}"
    if status == "fail":
        if "incorrect shape" in message:
            return "wrong output shape"
        if "Not equal to tolerance" in message or "Mismatched elements" in message or "Arrays are not equal" in message:
            return "wrong values"
        dtypes = _DTYPE.findall(message)
        if len(dtypes) == 2:
            return f"wrong output dtype ({dtypes[0]} instead of {dtypes[1]})"
        if "Items are not equal" in message:
            return "wrong number of outputs"
    lines = [s.strip() for s in message.splitlines() if s.strip()] or [status]
    kind, _, first = lines[0].rpartition(": ") if re.match(r"^\w+: Exception from", lines[0]) else ("", "", "")
    if kind:  # OpenVINO: "Exception from <file>", "Check '...' failed at <file>", then the reason
        useful = [s for s in [first, *lines[1:]] if not s.startswith(_OV_NOISE)]
        lines = [f"{kind}: {useful[0]}"] if useful else lines
    line = lines[0]
    line = re.sub(r"(/[\w.\-]+)+", "<path>", line)
    if not re.search(r": '\w{1,30}'$", line):  # a KeyError's key, its whole message, is kept
        line = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", line)
    line = re.sub(r"\b0x[0-9a-f]+\b", "N", line)
    line = re.sub(r"(?<![A-Za-z])\d+(\.\d+)?", "N", line)
    line = re.sub(r"\[[^\]]*\]", "[…]", line)
    return line[:110] + ("…" if len(line) > 110 else "")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(args) -> None:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if args.resume and out.exists() else {}
    data.setdefault("backends", {})
    import onnx

    data["onnx"] = onnx.__version__
    wanted = {KINDS[k] for k in args.kinds.split(",")}
    kinds = {n: k for n, (k, _) in _suite(_Adapter(None, 1)).items()}
    names = sorted(n for n, kind in kinds.items() if KINDS[kind] in wanted)
    if args.include:
        names = [n for n in names if re.search(args.include, n)]
    if args.every > 1:
        names = names[::args.every]
    if args.limit:
        names = names[:args.limit]
    for backend in args.backends.split(","):
        key = f"{backend}-plain" if args.no_lift else backend
        entry = data["backends"].setdefault(key, {"cases": {}})
        entry.update(threads=args.threads, timeout_s=args.timeout)
        if args.rerun_failed:
            entry["cases"] = {n: c for n, c in entry["cases"].items() if c["status"] == "pass"}
        todo = [n for n in names if n not in entry["cases"]]
        print(f"[{key}] {len(todo)} case(s) to run ({len(names) - len(todo)} already done)", flush=True)
        supervisor = Supervisor(backend, args.threads, args.timeout, lift=not args.no_lift)
        start, passed = time.monotonic(), sum(c["status"] == "pass" for c in entry["cases"].values())
        try:
            for i, name in enumerate(todo, 1):
                info = supervisor.run(name)
                info["kind"] = kinds[name]
                entry["cases"][name] = info
                passed += info["status"] == "pass"
                if info["status"] != "pass" and args.verbose:
                    print(f"[{key}] {name}: {info['status']}: {cause(info)}", flush=True)
                if i % SAVE_EVERY == 0 or i == len(todo):
                    entry["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                    _write_json(out, data)
                    rate = i / (time.monotonic() - start)
                    print(f"[{key}] {i}/{len(todo)} run, {passed} passed so far, {rate:.2f} case/s, "
                          f"ETA {(len(todo) - i) / rate / 60:.0f} min", flush=True)
        finally:
            supervisor.close()
            _write_json(out, data)


def summarise(results: dict, kind: str = "node") -> dict:
    out = {}
    for backend, entry in results.items():
        cases = {n: c for n, c in entry["cases"].items() if c.get("kind", "node") == kind}
        if not cases:
            continue
        failed = [cause(c) for c in cases.values() if c["status"] != "pass"]
        out[backend] = {"passed": len(cases) - len(failed), "total": len(cases),
                        "causes": collections.Counter(failed).most_common()}
    return out


def report(paths: list[str], doc: Path, top: int) -> str:
    results: dict = {}
    onnx_version = "?"
    for path in paths:
        data = json.loads(Path(path).read_text())
        onnx_version = data.get("onnx", onnx_version)
        for backend, entry in data["backends"].items():
            results.setdefault(backend, {"cases": {}})["cases"].update(entry["cases"])
    order = [b for b in ("ort", "openvino", "tvm", "cpu") if b in results] + \
            [b for b in results if b not in ("ort", "openvino", "tvm", "cpu")]
    node = summarise(results)
    lines = [
        "# ONNX backend test suite: dlopt's backends",
        "",
        f"`onnx.backend.test.BackendTest` (onnx {onnx_version}) run against `dlopt.onnx_backend.<name>`, "
        "which loads, checks, optimises (dlopt's generic fp32 passes) and compiles each model through "
        "dlopt's own backend code for the `cpu` profile, as `dlopt compile` does (no quantisation, no timing). "
        "One case per supervised worker process; a timeout or a crashed runtime counts as a failure.",
        "",
        "Produced by `python bench/conformance.py` (see its docstring); the per-case results are in the JSON "
        "it was given.",
        "",
        "## Node cases (1,884)",
        "",
        "| backend | node cases passed | plain engine wrapper: issue 17; here (bench/conformance_raw.py) "
        "| top failure causes (cases) |",
        "|---|---:|---:|---|",
    ]
    for backend in order:
        if backend not in node or backend.endswith("-plain") or backend.startswith("raw-"):
            continue
        s = node[backend]
        raw = RAW_ENGINES.get(backend)
        raw_text = f"{raw}" + (f" ({RAW_NOTE[backend]})" if backend in RAW_NOTE else "") if raw else "-"
        if f"raw-{backend}" in node:
            raw_text += f"; here {node[f'raw-{backend}']['passed']}"
        causes = "<br>".join(f"{n} × {c.replace('|', '/')}" for c, n in s["causes"][:top])
        lines.append(f"| {backend} | {s['passed']} / {s['total']} | {raw_text} | {causes} |")
    for kind in ("simple", "pytorch-converted", "pytorch-operator"):
        other = summarise(results, kind)
        if other:
            lines += ["", f"## {kind} cases", "", "| backend | passed |", "|---|---:|"]
            lines += [f"| {b} | {other[b]['passed']} / {other[b]['total']} |" for b in order
                      if b in other and not b.startswith("raw-")]
    lines += _lift_section(results, top)
    lines += _cpu_against_engines(results)
    ran_on = collections.Counter(c.get("ran_on") for c in results.get("cpu", {}).get("cases", {}).values()
                                 if c["status"] == "pass" and c.get("kind", "node") == "node")
    if ran_on:
        lines += ["", "`cpu` passed node cases by the backend that ran them: "
                  + ", ".join(f"{b} {n}" for b, n in ran_on.most_common() if b) + "."]
    text = "\n".join(lines) + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text + _kept_tail(doc))
    return text


def _lift_section(results: dict, top: int) -> list[str]:
    """Node cases each backend passes only with dlopt's lifting passes (``<backend>-plain`` runs)."""
    rows = []
    for plain in sorted(b for b in results if b.endswith("-plain")):
        backend = plain.removesuffix("-plain")
        lifted, bare = results.get(backend, {}).get("cases", {}), results[plain]["cases"]
        both = [n for n in bare if n in lifted and bare[n].get("kind", "node") == "node"]
        if not both:
            continue
        passed = lambda cases: sum(cases[n]["status"] == "pass" for n in both)  # noqa: E731
        gained = [n for n in both if lifted[n]["status"] == "pass" and bare[n]["status"] != "pass"]
        lost = [n for n in both if lifted[n]["status"] != "pass" and bare[n]["status"] == "pass"]
        causes = collections.Counter(cause(bare[n]) for n in gained).most_common(top)
        rows.append(f"| {backend} | {passed(lifted)} | {passed(bare)} | +{len(gained)} / -{len(lost)} | "
                    + "<br>".join(f"{n} × {c.replace('|', '/')}" for c, n in causes) + " |")
    if not rows:
        return []
    return ["", "## What dlopt's lifting passes add", "",
            "`prepare(..., lift=False)` leaves out function-body expansion (`ExpandFunctionOpsPass`) and, for "
            "TVM, the shape inputs bound and shapes folded at the first run (`FixInputShapesPass`, "
            "`BindShapeInputsPass`, `FoldConstantsPass`); input shapes are still fixed for TVM's static build.",
            "", "| backend | node cases passed | without lifting | cases gained / lost | "
            "what the gained cases failed with, without lifting |", "|---|---:|---:|---:|---|", *rows]


ENGINES = ("raw-ort", "raw-openvino", "raw-tvm", "ort", "openvino", "tvm")


def _engine_label(name: str) -> str:
    return f"{name.removeprefix('raw-')} (raw)" if name.startswith("raw-") else f"{name} (dlopt.onnx_backend.{name})"


def _cpu_against_engines(results: dict) -> list[str]:
    """``cpu`` against each single engine (raw wrappers, dlopt's one-engine backends) case by case,
    on the node cases all of them ran."""
    engines = [b for b in ENGINES if b in results]
    if "cpu" not in results or not engines:
        return []
    ran = lambda b: {n for n, c in results[b]["cases"].items() if c.get("kind", "node") == "node"}  # noqa: E731
    passed = lambda b, n: results[b]["cases"][n]["status"] == "pass"  # noqa: E731
    common = sorted(set.intersection(ran("cpu"), *(ran(b) for b in engines)))
    if not common:
        return []
    union = [n for n in common if any(passed(b, n) for b in engines)]
    rows = []
    for b in engines:
        lost = [n for n in common if passed(b, n) and not passed("cpu", n)]
        rows.append(f"| {_engine_label(b)} | {sum(passed(b, n) for n in common)} | {len(lost)} |")
    lost = [n for n in union if not passed("cpu", n)]
    only_cpu = [n for n in common if passed("cpu", n) and n not in union]
    lines = ["", f"## `cpu` against each engine, case by case ({len(common)} node cases)", "",
             f"`cpu` passes {sum(passed('cpu', n) for n in common)}; the union of the engines below "
             f"{len(union)}; `cpu` passes {len(only_cpu)} that none of them passes.", "",
             "| engine | passed | passed there, failed through `cpu` |", "|---|---:|---:|", *rows, ""]
    if not lost:
        return lines + ["`cpu` passes every one of these cases that any engine passes."]
    lines += ["Cases an engine passes and `cpu` fails (the reasons are in the notes below):", ""]
    for n in lost:
        info = results["cpu"]["cases"][n]
        by = ", ".join(_engine_label(b) for b in engines if passed(b, n))
        lines.append(f"* `{n}`: passed by {by}; `cpu` ran it on {info.get('ran_on', '-')}: "
                     f"{cause(info).replace('|', '/')}")
    return lines


_TAIL = "<!-- notes: kept when the table is regenerated -->"


def _kept_tail(doc: Path) -> str:
    """Hand-written notes below the marker survive a regeneration."""
    try:
        text = doc.read_text()
    except OSError:
        return ""
    return text[text.index(_TAIL):] if _TAIL in text else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="ort,openvino,tvm,cpu")
    parser.add_argument("--kinds", default="node", help=f"comma-separated: {', '.join(KINDS)}")
    parser.add_argument("--json", help="per-case results (read back with --resume)")
    parser.add_argument("--resume", action="store_true", help="skip the cases the JSON already holds")
    parser.add_argument("--rerun-failed", action="store_true", help="with --resume: run again the cases that failed")
    parser.add_argument("--no-lift", action="store_true",
                        help="prepare(lift=False): without dlopt's lifting passes (recorded as <backend>-plain)")
    parser.add_argument("--include", help="only cases whose name matches this regular expression")
    parser.add_argument("--every", type=int, default=1, metavar="N",
                        help="every N-th case of the (sorted, filtered) list: a sample of the suite")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each failure")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="write --doc from these result files")
    parser.add_argument("--doc", help="Markdown table to write (default with --report: docs/conformance.md)")
    parser.add_argument("--top", type=int, default=6, help="failure causes listed per backend")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, Path(args.doc or DEFAULT_DOC), args.top))
        return 0
    if not args.json:
        parser.error("--json PATH is needed to run cases")
    unknown = [k for k in args.kinds.split(",") if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    run(args)
    if args.doc:
        print(report([args.json], Path(args.doc), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
