"""Verify and time every candidate of a dlopt output on the machine this runs on.

Two lives, one source.  Inside dlopt it is ``dlopt.device.device_check``, the core of
``dlopt verify`` and ``dlopt bench``.  Pasted after ``dlopt/measure/fidelity.py``,
``dlopt/measure/timing.py`` and ``dlopt/device/device_guard.py`` (the checks of what a folder names) it
is the output's ``run_candidates.py``: a device with only numpy and a runtime
(onnxruntime, openvino or TVM's runtime) verifies and times the bundle without dlopt.  So this module imports nothing but the standard
library and numpy at the top, and each runtime only when a candidate needs it.

``verify.npz`` (written by ``dlopt compile``): a few evaluation feeds, the original
model's outputs on them, the labels where there are any, and a JSON ``meta`` with the
accuracy budget and, per candidate, the largest relative error it showed against the
original when it was built and the error it may show on the device.  The device check
is that the candidate reproduces, within that allowance, outputs that met the budget
when they were measured: a handful of samples cannot re-measure a budget of a point or
two of accuracy, but they do catch a device whose kernels, precision or runtime break
the artefact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

try:  # inside dlopt; in run_candidates.py these names are defined above this module
    from dlopt.device.device_guard import (JSON_MAX_BYTES, NATIVE_SUFFIXES, VerifyFileError, check_entry,
                                           check_native, check_settings, checked_settings, clamped_threads,
                                           contained_path, cores, first_words, is_bundle_dir, plain_runtime,
                                           read_json, read_json_object, shown)
    from dlopt.measure.fidelity import compare
    from dlopt.measure.timing import Timing, significantly_faster, time_interleaved
except ImportError:  # pragma: no cover - the standalone script
    pass

VERIFY_FILE = "verify.npz"
DEVICE_REPORT = "device_report.json"
SCRIPT = "run_candidates.py"
VERIFY_SCHEMA = 1
DEVICE_REPORT_SCHEMA = "1.0"
# Feeds kept for verification: enough samples to see a broken device, few enough to carry and emulate.
VERIFY_MAX_FEEDS = 16
VERIFY_MIN_SAMPLES = 16
VERIFY_MAX_BYTES = 8 << 20  # uncompressed: a recogniser's 6625-class outputs are 1 MB a line
# Most bytes a verify.npz may expand to when read, and a timing feed may take: 128 times what
# dlopt writes, so a crafted file (a zip bomb, a timing shape of 2e8) is refused in one line.
VERIFY_READ_MAX = 1 << 30
# A device may differ from the build machine by twice the error the candidate showed there (other
# kernels, other summation order), and never be held to less than these (relative to the output range).
ERROR_FACTOR = 2.0
ERROR_FLOOR = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 3e-2}
QUANTISED_FLOOR = 5e-2


def allowed_error(precision: str, error_here: float | None) -> float:
    """The relative error a candidate may show on the device (see the module's docstring)."""
    floor = ERROR_FLOOR.get(precision, QUANTISED_FLOOR)
    if error_here is None or not np.isfinite(error_here):
        return floor
    return float(max(ERROR_FACTOR * error_here, floor))


# -- verify.npz -------------------------------------------------------------------------------------

def verify_feeds(feeds: list, reference: list, labels: list | None) -> tuple[list, list, list | None]:
    """The first evaluation feeds, until VERIFY_MIN_SAMPLES samples, VERIFY_MAX_FEEDS feeds or
    VERIFY_MAX_BYTES of inputs and outputs (one feed at least)."""
    kept, samples, size = 0, 0, 0
    while kept < min(len(feeds), VERIFY_MAX_FEEDS) and samples < VERIFY_MIN_SAMPLES:
        first = next(iter(feeds[kept].values()))
        size += sum(np.asarray(a).nbytes for a in [*feeds[kept].values(), *reference[kept]])
        if kept and size > VERIFY_MAX_BYTES:
            break
        samples += int(first.shape[0]) if first.ndim else 1
        kept += 1
    return feeds[:kept], reference[:kept], (labels[:kept] if labels else None)


def write_verify(path: Path, *, feeds: list, reference: list, labels: list | None, meta: dict) -> None:
    """Write verify.npz: plain arrays named by position (names live in ``meta``), no pickles."""
    inputs = list(feeds[0])
    arrays = {}
    for f, feed in enumerate(feeds):
        arrays.update({f"in_{f}_{i}": np.asarray(feed[name]) for i, name in enumerate(inputs)})
        arrays.update({f"ref_{f}_{o}": np.asarray(out) for o, out in enumerate(reference[f])})
        if labels:
            arrays[f"labels_{f}"] = np.asarray(labels[f])
    meta = {"schema": VERIFY_SCHEMA, "feeds": len(feeds), "inputs": inputs, **meta}
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError, RecursionError, MemoryError)


def read_arrays(path: Path, max_bytes: int = VERIFY_READ_MAX) -> dict:
    """Every array of an ``.npz``, sizes checked before anything is inflated (as ``calibration/npz.py``).

    The zip directory's sizes must add up to at most ``max_bytes``, and no ``.npy`` header may
    declare more data than its zip entry holds; pickles and object arrays are refused.  So a
    small crafted file cannot make the reader allocate gigabytes.  Raises VerifyFileError.
    """
    from numpy.lib import format as npy

    path = Path(path)
    if not path.is_file():  # a FIFO would block the open, a folder is no archive
        raise VerifyFileError(f"{path} is missing or not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            total = sum(info.file_size for info in infos)
            if total > max_bytes:
                raise VerifyFileError(f"{path} expands to {total} bytes, over the {max_bytes} read from a verify "
                                      f"file (a zip bomb, or not dlopt's); recompile with dlopt")
            arrays = {}
            for info in infos:
                with archive.open(info) as fp:
                    version = npy.read_magic(fp)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"unsupported .npy version {version}")
                    reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = reader(fp)
                    if dtype.hasobject:
                        raise VerifyFileError(f"{path} holds pickled data ({info.filename}); dlopt never "
                                              f"unpickles: recompile with dlopt")
                    declared = math.prod(shape) * dtype.itemsize
                    held = info.file_size - fp.tell()
                    if declared > held:
                        raise VerifyFileError(f"{path}: {info.filename} declares {declared} bytes and holds {held} "
                                              f"(corrupt or crafted); recompile with dlopt")
                with archive.open(info) as fp:
                    name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                    arrays[name] = npy.read_array(fp, allow_pickle=False)
    except VerifyFileError:
        raise
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from exc
    return arrays


def _unreadable(path: Path, exc: BaseException) -> "VerifyFileError":
    gist = first_words(exc)
    return VerifyFileError(f"{path} is not a readable dlopt verify file ({type(exc).__name__}: {gist}); "
                           f"recompile with dlopt")


class VerifyData:
    """What verify.npz holds: ``feeds`` (dicts by input name), ``reference`` (output lists), ``meta``."""

    def __init__(self, path: Path) -> None:
        arrays = read_arrays(path)
        try:
            meta = json.loads(str(arrays["meta"]))
            count, inputs, outputs = int(meta["feeds"]), list(meta["inputs"]), list(meta["outputs"])
            if not 0 < count <= len(arrays) or not isinstance(meta.get("candidates", {}), dict):
                raise ValueError("meta does not describe this file")
            if not all(isinstance(e, dict) for e in meta.get("candidates", {}).values()):
                raise ValueError("a candidate entry is not an object")
            self.feeds = [{name: arrays[f"in_{f}_{i}"] for i, name in enumerate(inputs)} for f in range(count)]
            self.reference = [[arrays[f"ref_{f}_{o}"] for o in range(len(outputs))] for f in range(count)]
            self.labels = [arrays[f"labels_{f}"] for f in range(count)] if "labels_0" in arrays else None
        except _READ_ERRORS as exc:
            raise _unreadable(path, exc) from exc
        self.path, self.meta = path, meta
        timing_bytes(self.feeds[0], meta.get("timing_shapes"), where=str(path))  # refused here, not mid-run

    @property
    def candidates(self) -> dict:
        return self.meta.get("candidates", {})


# -- checking a candidate ---------------------------------------------------------------------------

def check(data: VerifyData, key: str, outputs: list) -> dict:
    """Compare a candidate's outputs on every verify feed with the original's: the device verdict."""
    entry = data.candidates.get(key, {})
    allowed = entry.get("allowed_rel_error") or allowed_error(entry.get("precision", "fp32"), None)
    fid = compare(data.reference, outputs)
    result = {"rel_error": _finite(fid.max_rel_error), "allowed_rel_error": allowed,
              "rel_error_at_build": entry.get("rel_error_at_build"), "min_cosine": _finite(fid.min_cosine),
              "top1_agreement": fid.top1_agreement}
    if data.labels is not None and outputs and np.asarray(outputs[0][0]).ndim >= 2:
        correct = sum(int(np.sum(np.asarray(o[0]).reshape(len(lab), -1).argmax(-1) == lab.reshape(-1)))
                      for o, lab in zip(outputs, data.labels))
        result["top1_accuracy"] = correct / sum(len(lab) for lab in data.labels)
    if fid.non_finite:
        return {**result, "verified": False, "reason": f"{fid.non_finite} where the original is finite"}
    if not fid.max_rel_error <= allowed:
        return {**result, "verified": False,
                "reason": f"relative error {fid.max_rel_error:.3g} over the {allowed:.3g} allowed "
                          f"({entry.get('rel_error_at_build')} when built)"}
    return {**result, "verified": True, "reason": None}


def _finite(value: float) -> float | None:
    return round(float(value), 8) if np.isfinite(value) else None


def timing_bytes(feed: dict, shapes, *, where: str) -> int:
    """Bytes of the timing feed ``shapes`` asks for; VerifyFileError past VERIFY_READ_MAX or malformed."""
    if not shapes:
        return 0
    if not isinstance(shapes, dict):
        raise VerifyFileError(f"{where}: timing_shapes is not an object; recompile with dlopt")
    total = 0
    for name, array in feed.items():
        want = shapes.get(name)
        if not want:
            continue
        if not isinstance(want, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in want):
            raise VerifyFileError(f"{where}: timing shape of {name!r} is not a list of sizes; recompile with dlopt")
        total += want[0] * math.prod(array.shape[1:]) * array.dtype.itemsize
    if total > VERIFY_READ_MAX:
        raise VerifyFileError(f"{where}: the timing shapes need {total} bytes of inputs, over the "
                              f"{VERIFY_READ_MAX} a verify file may ask for; recompile with dlopt")
    return total


def timing_feed(data: VerifyData, shapes: dict | None) -> dict:
    """A feed at the timed shape of the report, from the first verify feed's samples where it can be."""
    feed = data.feeds[0]
    if not shapes:
        return feed
    timing_bytes(feed, shapes, where=str(data.path))
    made = {}
    for name, array in feed.items():
        want = shapes.get(name)
        if not want or len(want) != array.ndim or list(array.shape[1:]) != list(want[1:]):
            return feed
        made[name] = np.resize(array, (int(want[0]), *array.shape[1:])).astype(array.dtype)
    return made


def open_plain(folder: Path, backend: str, threads: int | None = None):
    """A ``run(feeds) -> list of arrays`` over the candidate in ``folder`` using only its runtime (its
    backend's companion module: ``plain_runtime``)."""
    plain = plain_runtime(backend)
    if not isinstance(plain, type):
        raise Skipped(f"{backend} candidates are not run by this script: {plain or 'unknown backend'}")
    runtime = plain.runtime()
    settings = checked_settings(folder, backend)
    reason = plain.not_here(settings, _machine())
    if reason:
        raise Skipped(reason)
    return plain.open(runtime, folder, settings, threads, clamped_threads)


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


class Skipped(Exception):
    """A candidate this machine cannot run; the message says why."""


# -- the whole run ----------------------------------------------------------------------------------

def host_info() -> dict:
    """This machine, read before any runtime narrows the thread's CPU affinity."""
    return {"machine": _machine(), "system": platform.system(), "node": platform.node(),
            "cores": cores(), "python": platform.python_version(), "processor": _cpu_model()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_candidates(data: VerifyData, opener, *, keys: list[str] | None = None, bench: bool = True,
                   runs: int = 100, warmup: int = 10, threads: int | None = None, shapes: dict | None = None,
                   log=None) -> list[dict]:
    """Verify (and with ``bench``, time interleaved) every candidate ``opener(key, entry)`` can open.

    ``opener`` returns ``(run, ran_as)``, or ``(run, ran_as, timer)`` for a candidate timed
    on its own device (``timer(feed, runs, warmup) -> Timing``, e.g. over TVM's RPC), or
    raises Skipped; rows come back in the order of ``data.candidates``.  Only verified
    candidates are timed; the local ones all in one interleaved run.
    """
    rows, runners, timers = [], {}, {}
    for key, entry in data.candidates.items():
        if keys and key not in keys:
            continue
        row = {"key": key, "dir": entry.get("dir"), "backend": entry.get("backend"),
               "precision": entry.get("precision"), "ran_as": None, "verified": None, "latency": None}
        try:
            opened = opener(key, entry)
            run, row["ran_as"] = opened[:2]
            started = time.perf_counter()
            outputs = [[np.asarray(o) for o in run(feed)] for feed in data.feeds]
            row["verify_seconds"] = round(time.perf_counter() - started, 3)
            row.update(check(data, key, outputs))
        except Skipped as exc:
            row.update(verified=None, reason=f"not run here: {exc}")
        except Exception as exc:  # the runtime's own errors: the candidate fails on this machine
            row.update(verified=False, reason=f"failed to run: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                       if str(exc) else f"failed to run: {type(exc).__name__}")
        else:
            if row["verified"] and len(opened) > 2:
                timers[key] = opened[2]
            elif row["verified"]:
                runners[key] = run
        if log:
            log(f"{key}: " + ("verified" if row["verified"] else "NOT verified" if row["verified"] is False
                              else "skipped") + (f" ({row['reason']})" if row.get("reason") else ""))
        rows.append(row)
    if bench and timers:
        feed = timing_feed(data, shapes)
        for row in rows:
            if row["key"] in timers:
                row["latency"] = timers[row["key"]](feed, runs, warmup).to_dict()
                row["timing_shape"] = {k: list(v.shape) for k, v in feed.items()}
    if bench and runners:
        feed = timing_feed(data, shapes)
        if log:
            log(f"timing {len(runners)} candidate(s) interleaved at "
                + ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items()))
        timings = time_interleaved(runners, feed, runs=runs, warmup=warmup, threads=threads or 0)
        for row in rows:
            if row["key"] in timings:
                row["latency"] = timings[row["key"]].to_dict()
                row["timing_shape"] = {k: list(v.shape) for k, v in feed.items()}
    return rows


def fastest(rows: list[dict], current: str | None = None):
    """(key of the fastest verified candidate timed natively, why); the current one stays on a tie."""
    timed = [r for r in rows if r.get("verified") and r.get("latency") and r.get("ran_as") == "native"]
    if not timed:
        return None, "no candidate was verified and timed natively here"
    best = min(timed, key=lambda r: r["latency"]["p50_ms"])
    now = next((r for r in timed if r["key"] == current), None)
    elsewhere = sorted(r["key"] for r in rows if r.get("verified") and r.get("latency") and r.get("ran_as") != "native")
    if now is None or now is best:
        return best["key"], (f"fastest verified: {best['key']} at {best['latency']['p50_ms']:.3f} ms (p50)"
                             + (f" among those timed natively here (not compared: {', '.join(elsewhere)}, timed on "
                                "another machine through RPC or emulation)" if elsewhere else ""))
    if significantly_faster(Timing(**best["latency"]), Timing(**now["latency"])):
        return best["key"], (f"{best['key']} at {best['latency']['p50_ms']:.3f} ms is significantly faster than "
                             f"{current} at {now['latency']['p50_ms']:.3f} ms (95% intervals of the median apart)")
    return current, (f"{current} kept: {best['key']} ({best['latency']['p50_ms']:.3f} ms) is not significantly faster "
                     f"than it ({now['latency']['p50_ms']:.3f} ms): 95% intervals overlap, fewer than 20 runs, or "
                     f"a gain under 5 us")


def device_report(rows: list[dict], *, tool: str, host: dict, top_level: str | None, best: str | None, why: str,
                  runs: int, threads: int | None) -> dict:
    return {"schema_version": DEVICE_REPORT_SCHEMA, "tool": tool,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": host,
            "top_level": top_level, "fastest_verified": best, "why": why, "runs": runs, "threads": threads,
            "candidates": rows}


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` whole or not at all."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a new file is 0644)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- run_candidates.py ------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=SCRIPT, description="Verify every candidate of this dlopt output against verify.npz on this machine, "
        f"time the verified ones interleaved, and write {DEVICE_REPORT}. Needs numpy and each candidate's runtime.")
    parser.add_argument("--out", type=Path, default=Path(sys.argv[0]).resolve().parent,
                        help="the dlopt output folder [default: the folder of this script]")
    parser.add_argument("--candidate", action="append", help="only this candidate key (e.g. ort/int8); repeatable")
    parser.add_argument("--verify-only", action="store_true", help="verify, do not time")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per candidate [default: 100]")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="threads [default: as each candidate shipped]")
    parser.add_argument("--report", type=Path, default=None, help=f"where to write the report [default: OUT/{DEVICE_REPORT}]")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    log = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        data = VerifyData(args.out / VERIFY_FILE)
    except VerifyFileError as exc:
        print(f"{SCRIPT}: error: {exc}", file=sys.stderr)
        return 2
    unknown = [k for k in args.candidate or [] if k not in data.candidates]
    if unknown:
        print(f"{SCRIPT}: error: no candidate {unknown[0]}; this output has {', '.join(data.candidates)}", file=sys.stderr)
        return 2

    host = host_info()

    try:
        manifest = read_json_object(args.out / "manifest.json")
        folders = {key: contained_path(args.out, entry.get("dir")) for key, entry in data.candidates.items()
                   if not args.candidate or key in args.candidate}
        for key, folder in folders.items():
            check_entry(manifest, key, data.candidates[key], where=str(args.out / VERIFY_FILE))
            check_native(args.out, folder, manifest)
            if isinstance(plain_runtime(data.candidates[key].get("backend")), type):  # refused up front, not as a failed row
                checked_settings(folder, data.candidates[key]["backend"])
    except VerifyFileError as exc:
        print(f"{SCRIPT}: error: {exc}", file=sys.stderr)
        return 2

    def opener(key, entry):
        return open_plain(folders[key], entry.get("backend"), args.threads), "native"

    rows = run_candidates(data, opener, keys=args.candidate, bench=not args.verify_only, runs=args.runs,
                          warmup=args.warmup, threads=args.threads, shapes=data.meta.get("timing_shapes"), log=log)
    top = data.meta.get("top_level")
    best, why = fastest(rows, top) if not args.verify_only else (None, "not timed (--verify-only)")
    report = device_report(rows, tool=SCRIPT, host=host, top_level=top, best=best, why=why, runs=args.runs, threads=args.threads)
    write_json(args.report or args.out / DEVICE_REPORT, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in rows:
            lat = f"{r['latency']['p50_ms']:.3f} ms" if r.get("latency") else "-"
            err = "-" if r.get("rel_error") is None else f"{r['rel_error']:.2e}"
            state = {True: "verified", False: "FAILED", None: "skipped"}[r["verified"]]
            print(f"{r['key']:<20} {state:<9} rel error {err:<9} p50 {lat:<12} {r.get('reason') or ''}")
        print(why)
    return 1 if any(r["verified"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
