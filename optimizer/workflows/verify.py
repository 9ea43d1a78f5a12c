"""``dlopt verify`` and ``dlopt bench``: check and time an output's candidates on this machine.

Every candidate the output ships (the top-level one and each ``bundle/`` candidate) is
run on the feeds of ``verify.npz`` and compared with the original's outputs there
(``dlopt.device.device_check``).  Candidates that run here are loaded with ``dlopt.load`` and
the verified ones timed in one interleaved run.  A TVM library for aarch64 on an x86
machine runs under qemu-aarch64 when the emulation environment is there
(``dlopt.device.emulation``): its rows say "qemu-aarch64 emulation" and its timings are never
compared with native ones.  The results go to ``OUT/device_report.json`` and into the
output's report.md and report.html; ``dlopt.workflows.promote.select`` (``bench --select``) moves
the fastest verified candidate to the top level.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from dlopt import __version__
from dlopt.core.artifacts import MANIFEST, check_native_files, contained_path, output_lock, read_folder_json, resolve_output
from dlopt.core.errors import ConfigError, TargetUnavailable, first_line
from dlopt.core.profiles import host_arch
from dlopt.device.device_check import (DEVICE_REPORT, SCRIPT, VERIFY_FILE, Skipped, VerifyData, VerifyFileError,
                                       check_entry, check_settings, device_report, fastest, host_info, run_candidates,
                                       write_json, write_text)
from dlopt.device.device_files import script_source
from dlopt.device.emulation import LABEL as EMULATED, aarch64_python, qemu_cpu_models, run_emulated
from dlopt.measure.runner import load
from dlopt.measure.timing import Timing
from dlopt.report.data import Report
from dlopt.report.html import render_html
from dlopt.targets import get_backend, read_artifact, read_manifest, refuse_decoder_output, runs_over_rpc
from dlopt.targets.tvm.rpc import require

# Emulated runs: the verify feeds and a few timed runs (a Cortex-A76 library under qemu is
# tens of times slower than native; its timings only show that it ran).
EMULATED_RUNS = 20
EMULATED_TIMEOUT_S = 600


def check_output(out: Path, *, bench: bool, keys: list[str] | None = None, threads: int | None = None,
                 runs: int = 100, warmup: int = 10, remote=None, choosing: bool = False,
                 log: Callable[[str], None] | None = None) -> dict:
    """Verify (and with ``bench``, time) the candidates of ``out``; write and return the device report.

    ``remote`` (a dlopt.targets.tvm.rpc.RemoteDevice): TVM libraries run on that device
    through its RPC tracker, timed there, instead of here or under emulation.  ``choosing``
    (``bench --select``): refused before anything runs when this machine is not the target's
    architecture, whose timings cannot choose for it."""
    out = resolve_output(Path(out))
    manifest = read_manifest(out)
    if manifest is None or "dlopt_version" not in manifest:
        raise ConfigError(f"{out} is not a dlopt output folder (no dlopt manifest.json)")
    data = read_verify(out)
    folders = _checked_folders(out, manifest, data, keys)
    wanted = list(folders)
    report_json = read_folder_json(out, "report.json", missing_ok=True)
    target = report_json.get("target") if isinstance(report_json, dict) else None
    target = target if isinstance(target, dict) else {}
    host = host_info()  # before any runtime narrows this thread's CPUs
    if choosing and target.get("arch") and target.get("arch") != host["machine"]:
        raise ConfigError(f"--select: this machine ({host['machine']}) is not the {target.get('name')} device "
                          f"({target.get('arch')}); timings here do not choose for it: run `dlopt bench --select` "
                          f"there (nothing was run)")
    if remote is not None:
        _check_remote(out, data, wanted, keys, remote)
    on_remote = {k for k in wanted if remote is not None and runs_over_rpc(data.candidates[k].get("backend"))}
    emulated = {k: _emulation_plan(folders[k], data.candidates[k]) for k in wanted if k not in on_remote}
    emulated = {k: v for k, v in emulated.items() if v is not None}
    native = [k for k in wanted if k not in emulated]
    opener = _Opener(folders, on_remote, remote, threads)
    try:
        rows = run_candidates(data, opener, keys=native, bench=bench, runs=runs, warmup=warmup, threads=threads,
                              shapes=data.meta.get("timing_shapes"), log=log) if native else []
    finally:
        opener.close()
    if opener.unreachable:
        raise opener.unreachable[0]
    for key, plan in emulated.items():
        entry = data.candidates[key]
        rows.append({"key": key, "dir": entry.get("dir"), "backend": entry.get("backend"),
                     "precision": entry.get("precision"),
                     **_run_emulated(out, key, plan, bench=bench, threads=threads, log=log)})
    order = list(data.candidates)
    rows.sort(key=lambda r: order.index(r["key"]))
    top = manifest.get("backend") and f"{manifest['backend']}/{manifest['precision']}"
    best, why = fastest(rows, top) if bench else (None, "not timed (dlopt verify)")
    report = device_report(rows, tool=f"dlopt {'bench' if bench else 'verify'} {__version__}", host=host,
                           top_level=top, best=best, why=why, runs=runs, threads=threads)
    report["target"] = {"name": target.get("name") or data.meta.get("target"), "arch": target.get("arch")}
    report["this_machine_matches_target_arch"] = target.get("arch") == host["machine"] if target.get("arch") else None
    report["original"] = _original_note(out, top, report_json) if bench else None
    with output_lock(out):
        write_json(out / DEVICE_REPORT, report)
        rerender_reports(out, report)
    return report


def _checked_folders(out: Path, manifest: dict, data: VerifyData, keys: list[str] | None) -> dict[str, Path]:
    """The folder of each candidate asked for (all by default), each checked before anything is loaded.

    Every folder verify.npz names stays inside the output, and native code in them is as published.
    And each is the folder the manifest ships that candidate in, holding that candidate: a verify.npz
    pointing tvm/fp32 at the top-level ONNX would call a library verified that never ran."""
    unknown = [k for k in keys or [] if k not in data.candidates]
    if unknown:
        raise ConfigError(f"{out} has no candidate {unknown[0]}; it has {', '.join(data.candidates)}")
    wanted = [k for k in data.candidates if not keys or k in keys]
    folders = {k: contained_path(out, data.candidates[k].get("dir"), named_in=VERIFY_FILE) for k in wanted}
    for k in wanted:
        _check_candidate(out, manifest, k, data.candidates[k], folders[k])
        check_native_files(out, folders[k], _candidate_files(out, folders[k], manifest), manifest)
    return folders


def _check_remote(out: Path, data: VerifyData, wanted: list[str], keys: list[str] | None, remote) -> None:
    """ConfigError unless a wanted candidate runs over RPC; then the device's tracker must answer."""
    if not any(runs_over_rpc(data.candidates[k].get("backend")) for k in wanted):
        what = f"the candidates asked for in {out} ({', '.join(wanted)}) hold" if keys else \
            f"{out} ({', '.join(wanted)}) holds"
        raise ConfigError(f"--rpc-tracker runs TVM libraries on the device, and {what} none; drop "
                          f"--rpc-tracker/--rpc-key, or run `dlopt bench` on the device itself")
    require(remote)


class _Opener:
    """Opens a candidate for ``run_candidates``: ``dlopt.load`` here, or its library on the remote device
    (run and timed there).  A device that stops answering is kept in ``unreachable``: one line, not a row."""

    def __init__(self, folders: dict[str, Path], on_remote: set[str], remote, threads: int | None) -> None:
        self.folders, self.on_remote, self.remote, self.threads = folders, on_remote, remote, threads
        self.opened: list = []
        self.unreachable: list[TargetUnavailable] = []

    def __call__(self, key, entry):
        if key in self.on_remote:
            return self._remote(key)
        try:
            runner = load(self.folders[key], threads=self.threads)
        except TargetUnavailable as exc:
            raise Skipped(first_line(exc)) from exc
        self.opened.append(runner)
        return runner.run, "native"

    def _remote(self, key):
        artifact, _ = read_artifact(self.folders[key])
        try:
            session = get_backend(artifact.backend).load_remote(artifact, self.remote, threads=self.threads)
        except TargetUnavailable as exc:  # the device, not the candidate, failed: one line, not a row
            self.unreachable.append(exc)
            raise Skipped(first_line(exc)) from exc
        self.opened.append(session)

        def run(feed):
            try:
                return session.run(feed)
            except TargetUnavailable as exc:  # the relay cut a session that stopped answering
                self.unreachable.append(exc)
                raise

        def timer(feed, runs, warmup):
            per_run = session.time_ms(feed, runs=runs, warmup=warmup)
            return Timing.from_device(per_run, warmup=warmup, threads=session.threads)

        return run, f"rpc {self.remote.key}", timer

    def close(self) -> None:
        for runner in self.opened:
            runner.close()


def _original_note(out: Path, top: str | None, compiled) -> str | None:
    """One line on the original model, which bench cannot time: an output ships only what the compile
    kept (the original's outputs are in verify.npz, the model itself is not); None when it ships."""
    if top == "ort/original":
        return None  # the top-level candidate is the input model, unchanged
    baseline = compiled.get("baseline") if isinstance(compiled, dict) else None
    latency = baseline.get("latency") if isinstance(baseline, dict) else None
    p50 = latency.get("p50_ms") if isinstance(latency, dict) else None
    when = (f"; the compile timed it beside them at {p50:.3f} ms p50 (report.md)" if isinstance(p50, (int, float))
            and not isinstance(p50, bool) else "")
    return (f"original: not in {out.name}/ (an output ships only the candidates the compile kept), so bench does "
            f"not time it{when}")


def read_verify(out: Path) -> VerifyData:
    """The output's verify.npz, read through its size guard; a ConfigError (one line) if it cannot be."""
    path = contained_path(out, VERIFY_FILE)
    if not path.exists():
        refuse_decoder_output(out, read_folder_json(out, MANIFEST, missing_ok=True))
        raise ConfigError(f"{out} has no {VERIFY_FILE} (written by dlopt 0.1.0 compiles from wave 2 on); recompile it")
    try:
        return VerifyData(path)
    except VerifyFileError as exc:
        raise ConfigError(first_line(exc)) from exc


def _check_candidate(out: Path, manifest: dict, key: str, entry: dict, folder: Path) -> None:
    """ConfigError unless verify.npz's ``entry`` is where the manifest ships ``key`` and the folder
    there opens as a ``key`` artefact (its backend and precision as dlopt.load reads them)."""
    try:
        check_entry(manifest, key, entry, where=str(out / VERIFY_FILE))
    except VerifyFileError as exc:
        raise ConfigError(first_line(exc)) from exc
    try:
        artifact, _ = read_artifact(folder)  # a folder that is no artefact at all: its ConfigError, one line
    except TargetUnavailable:
        return  # a backend this dlopt does not load: skipped in its own row
    if f"{artifact.backend}/{artifact.precision}" != key:
        raise ConfigError(f"{folder} holds a {artifact.backend}/{artifact.precision} artefact, not {key} as "
                          f"{VERIFY_FILE} and the manifest say; nothing was run (a crafted or damaged output: "
                          f"recompile)")
    try:  # the settings run_candidates.py would refuse are refused here too, before anything runs
        check_settings(artifact.backend, artifact.settings, folder / get_backend(artifact.backend).settings_file)
    except VerifyFileError as exc:
        raise ConfigError(first_line(exc)) from exc


def _candidate_files(out: Path, folder: Path, manifest: dict) -> list[str]:
    """The files of the candidate in ``folder``: the manifest's list at the top level, else the folder's."""
    if folder.resolve() == out.resolve():
        files = manifest.get("files")
        return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _emulation_plan(folder: Path, entry: dict):
    """For an aarch64 TVM library on another machine: the emulated Python, or a Skipped reason; else None."""
    backend = get_backend(entry.get("backend")) if isinstance(entry.get("backend"), str) else None
    if backend is None:
        return None
    try:
        settings = read_folder_json(folder, backend.settings_file)
    except ConfigError:
        return None  # its own row says why it cannot be opened
    if not isinstance(settings, dict):
        return None

    arch, mcpu = backend.library_cpu(settings) or ("", "")  # none for a CUDA library (Jetson): it needs the GPU
    if arch != "aarch64" or host_arch() == "aarch64":
        return None
    python = aarch64_python()
    if isinstance(python, str):
        return Skipped(f"an aarch64 {backend.runtime_name} library and no emulation here: {python}")
    return mcpu or None


def _run_emulated(out: Path, key: str, plan, *, bench: bool, threads: int | None, log) -> dict:
    """Run dlopt's own run_candidates.py for ``key`` under qemu-aarch64; its row, labelled emulated.

    Never the script in ``out``: that is Python written by whoever wrote the folder."""
    entry_row = {"key": key, "ran_as": EMULATED, "verified": None, "latency": None}
    if isinstance(plan, Skipped):
        return {**entry_row, "ran_as": None, "reason": f"not run here: {plan}"}

    with tempfile.TemporaryDirectory(prefix="dlopt-emulated-") as tmp:
        script = Path(tmp) / SCRIPT
        script.write_text(script_source())
        result_file = Path(tmp) / "device_report.json"
        args = ["--out", str(out), "--candidate", key, "--report", str(result_file), "--json"]
        args += ["--runs", str(EMULATED_RUNS), "--warmup", "2"] if bench else ["--verify-only"]
        if log:
            log(f"{key}: running under {EMULATED} (slow: an emulated CPU)")
        # Emulate the board's own CPU where qemu knows it: its default CPU has every extension,
        # and only the named one shows that the library avoids what the board lacks.
        cpu = plan if plan in qemu_cpu_models() else None
        done = None
        try:
            done = run_emulated(script, args, cwd=out, timeout=EMULATED_TIMEOUT_S, threads=threads, cpu=cpu)
            row = json.loads(result_file.read_text())["candidates"][0]
        except TargetUnavailable as exc:  # a timeout: nothing was decided
            return {**entry_row, "reason": f"not run to the end: {first_line(exc)}"}
        except (OSError, ValueError, KeyError, IndexError) as exc:
            tail = (done.stderr if done is not None else "").strip().splitlines()[-1:]
            return {**entry_row, "verified": False,
                    "reason": f"the emulated run failed: {first_line(exc)} {' '.join(tail)}".strip()}
    row["ran_as"] = f"{EMULATED} ({cpu})" if cpu else EMULATED
    if log:
        log(f"{key}: " + ("verified" if row.get("verified") else "NOT verified" if row.get("verified") is False
                          else "skipped") + f" under {EMULATED}")
    return row


def rerender_reports(out: Path, device: dict) -> None:
    """report.md and report.html again, with the device's results (report.json stays as compiled)."""
    try:
        report_dict = json.loads((out / "report.json").read_text())
        report = Report.from_dict(report_dict)
    except (OSError, ValueError, KeyError, TypeError):
        return  # an output without a readable report.json has no report to add to
    write_text(out / "report.md", report.to_markdown(device))
    write_text(out / "report.html", render_html(report_dict, device))
