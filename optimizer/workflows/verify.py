"""``dlopt verify`` and ``dlopt bench``: check and time an output's candidates on this machine.

Every candidate the output ships (the top-level one and each ``bundle/`` candidate) is
run on the feeds of ``verify.npz`` and compared with the original's outputs there
(``dlopt.device.device_check``).  Candidates that run here are loaded with ``dlopt.load`` and
the verified ones timed in one interleaved run.  A TVM library for aarch64 on an x86
machine runs under qemu-aarch64 when the emulation environment is there
(``dlopt.device.emulation``): its rows say "qemu-aarch64 emulation" and its timings are never
compared with native ones.  The results go to ``OUT/device_report.json`` and into the
output's report.md and report.html; ``select`` moves the fastest verified candidate to
the top level.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from dlopt import __version__
from dlopt.core.artifacts import (FILE_HASHES, MANIFEST, check_native_files, contained_path, output_lock, move_into_place,
                             read_folder_json, resolve_output, staging_dir)
from dlopt.core.errors import ConfigError, TargetUnavailable, first_line
from dlopt.device.device_check import (DEVICE_REPORT, SCRIPT, VERIFY_FILE, Skipped, VerifyData,
                                VerifyFileError, check_entry, check_settings, device_report, fastest, host_info,
                                is_bundle_dir, read_arrays, run_candidates, shown, write_json, write_text)
from dlopt.measure.timing import Timing
from dlopt.targets import get_backend, read_artifact, read_manifest, runs_over_rpc

from dlopt.device.emulation import LABEL as EMULATED, aarch64_python, qemu_cpu_models, run_emulated
from dlopt.core.profiles import host_arch
from dlopt.device.device_files import script_source
from dlopt.measure.runner import load
from dlopt.report.data import Report
from dlopt.report.html import render_html
from dlopt.report.readme import README, render_readme
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
    unknown = [k for k in keys or [] if k not in data.candidates]
    if unknown:
        raise ConfigError(f"{out} has no candidate {unknown[0]}; it has {', '.join(data.candidates)}")
    wanted = [k for k in data.candidates if not keys or k in keys]
    # Every folder verify.npz names stays inside the output, and native code in them is as published,
    # before any candidate is loaded.
    # And each is the folder the manifest ships that candidate in, holding that candidate: a verify.npz
    # pointing tvm/fp32 at the top-level ONNX would call a library verified that never ran.
    folders = {k: contained_path(out, data.candidates[k].get("dir"), named_in=VERIFY_FILE) for k in wanted}
    for k in wanted:
        _check_candidate(out, manifest, k, data.candidates[k], folders[k])
        check_native_files(out, folders[k], _candidate_files(out, folders[k], manifest), manifest)
    report_json = read_folder_json(out, "report.json", missing_ok=True)
    target = report_json.get("target") if isinstance(report_json, dict) else None
    target = target if isinstance(target, dict) else {}
    host = host_info()  # before any runtime narrows this thread's CPUs
    if choosing and target.get("arch") and target.get("arch") != host["machine"]:
        raise ConfigError(f"--select: this machine ({host['machine']}) is not the {target.get('name')} device "
                          f"({target.get('arch')}); timings here do not choose for it: run `dlopt bench --select` "
                          f"there (nothing was run)")
    if remote is not None:
        if not any(runs_over_rpc(data.candidates[k].get("backend")) for k in wanted):
            what = f"the candidates asked for in {out} ({', '.join(wanted)}) hold" if keys else \
                f"{out} ({', '.join(wanted)}) holds"
            raise ConfigError(f"--rpc-tracker runs TVM libraries on the device, and {what} none; drop "
                              f"--rpc-tracker/--rpc-key, or run `dlopt bench` on the device itself")
        require(remote)
    on_remote = {k for k in wanted if remote is not None and runs_over_rpc(data.candidates[k].get("backend"))}
    emulated = {k: _emulation_plan(folders[k], data.candidates[k]) for k in wanted if k not in on_remote}
    emulated = {k: v for k, v in emulated.items() if v is not None}
    opened, unreachable = [], []

    def opener(key, entry):
        if key in on_remote:
            artifact, _ = read_artifact(folders[key])
            try:
                session = get_backend(artifact.backend).load_remote(artifact, remote, threads=threads)
            except TargetUnavailable as exc:  # the device, not the candidate, failed: one line, not a row
                unreachable.append(exc)
                raise Skipped(first_line(exc)) from exc
            opened.append(session)

            def run(feed):
                try:
                    return session.run(feed)
                except TargetUnavailable as exc:  # the relay cut a session that stopped answering
                    unreachable.append(exc)
                    raise

            def timer(feed, runs, warmup):
                per_run = session.time_ms(feed, runs=runs, warmup=warmup)
                return Timing.from_device(per_run, warmup=warmup, threads=session.threads)

            return run, f"rpc {remote.key}", timer
        try:
            runner = load(folders[key], threads=threads)
        except TargetUnavailable as exc:
            raise Skipped(first_line(exc)) from exc
        opened.append(runner)
        return runner.run, "native"

    native = [k for k in wanted if k not in emulated]
    try:
        rows = run_candidates(data, opener, keys=native, bench=bench, runs=runs, warmup=warmup, threads=threads,
                              shapes=data.meta.get("timing_shapes"), log=log) if native else []
    finally:
        for runner in opened:
            runner.close()
    if unreachable:
        raise unreachable[0]
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


# -- --select ---------------------------------------------------------------------------------------

def select(out: Path, key: str) -> str:
    """Move candidate ``key`` from bundle/ to the top level of ``out`` and the top-level one into bundle/.

    Works on a hard-linked copy of the output and renames it into place, so the folder is
    either as it was or wholly re-laid out.  Returns a line saying what moved.
    """
    out = resolve_output(Path(out))
    with output_lock(out):
        manifest = read_manifest(out)
        if manifest is None or not all(isinstance(manifest.get(k), str) for k in ("backend", "precision")):
            raise ConfigError(f"{out} is not a dlopt output folder (no dlopt manifest.json)")
        top = f"{manifest['backend']}/{manifest['precision']}"
        if key == top:
            return f"{key} is already at the top level of {out}"
        bundle = manifest.get("bundle") or {}
        if not isinstance(bundle, dict):
            raise ConfigError(f"{out / MANIFEST}: bundle is not a JSON object; recompile it")
        bundle = dict(bundle)
        if key not in bundle:
            raise ConfigError(f"{key} is not a bundle candidate of {out}; it has {', '.join(bundle) or 'none'}")
        published, files = manifest.get("published"), manifest.get("files")
        if not isinstance(published, list) or not isinstance(files, list):
            raise ConfigError(f"{out / MANIFEST} lacks the files and published lists; recompile it")
        # Every path the manifest names stays inside the output, with no symlink anywhere in what moves:
        # a crafted manifest must not move another folder's files in (and remove that folder).
        for name in published:
            _no_symlinks_in(contained_path(out, name, named_in=f"{MANIFEST} published"), out)
        for f in files:
            if contained_path(out, f, named_in=f"{MANIFEST} files").parent != out:
                raise ConfigError(f"{out / MANIFEST} lists {f!r} as a top-level file; recompile it")
        _check_bundle_dirs(out, bundle)
        report = read_folder_json(out, "report.json")
        if not isinstance(report, dict):
            raise ConfigError(f"{out / 'report.json'} does not hold a JSON object; nothing was moved, recompile it")
        rows = _report_rows(out, report, (top, key))
        new_dir = bundle.pop(key)
        # The top-level candidate's files, and the ONNX it was built from where that is not one of them.
        old_files = list(files) + [f for f in ("model.onnx", "model.onnx.data")
                                   if f not in files and (out / f).is_file()]
        old_dir = f"bundle/{top.replace('/', '-')}"
        if not is_bundle_dir(old_dir):
            raise ConfigError(f"{out / MANIFEST} names the top-level candidate {top!r}, which makes no bundle/ folder "
                              f"name; recompile it")
        old_path = contained_path(out, old_dir, named_in=MANIFEST)
        if old_path.exists() or old_path.is_symlink():
            raise ConfigError(f"{out} already holds {old_dir}, where --select moves the top-level {top}; nothing was "
                              f"moved: remove or rename that folder (dlopt did not write it there)")
        unmoved = [f for f in ["bundle", *old_files] if f not in published or not (out / f).exists()]
        if unmoved:
            raise ConfigError(f"{out / MANIFEST} does not publish {unmoved[0]}, which --select moves; nothing was "
                              f"moved, recompile it")
        clash = next((p.name for p in (out / new_dir).iterdir()
                      if p.name in published and p.name not in old_files), None)
        if clash is not None:  # a bundle/<folder>/bundle or manifest.json would land on the output's own
            raise ConfigError(f"{new_dir} holds {clash}, which --select would move onto the output's own; nothing "
                              f"was moved, recompile it")
        with staging_dir(out) as staged:
            for name in published:
                source = out / name
                if source.is_dir() and not source.is_symlink():
                    shutil.copytree(source, staged / name, copy_function=os.link)
                elif source.is_file() and not source.is_symlink():
                    os.link(source, staged / name)
            (staged / old_dir).mkdir()
            for f in old_files:
                os.replace(staged / f, staged / old_dir / f)
            new_files = sorted(p.name for p in (staged / new_dir).iterdir())
            for f in new_files:
                os.replace(staged / new_dir / f, staged / f)
            (staged / new_dir).rmdir()
            bundle[top] = old_dir
            rows[top]["artifact_dir"], rows[key]["artifact_dir"] = old_dir, "."
            rows[top]["chosen"], rows[key]["chosen"] = False, report.get("chosen") is not None
            report["chosen"] = key if report.get("chosen") is not None else None
            report["notes"] = [*report.get("notes", []), f"dlopt bench --select moved {key} to the top level "
                                                          f"(it was in {new_dir}; {top} is now in {old_dir})"]
            backend, precision = key.split("/", 1)
            manifest.update(backend=backend, precision=precision, files=new_files, bundle=bundle)
            hashes = manifest.get(FILE_HASHES)
            if isinstance(hashes, dict):  # the published hashes follow their files (never re-hashed here)
                moved = {f: f"{old_dir}/{f}" for f in old_files} | {f"{new_dir}/{f}": f for f in new_files}
                manifest[FILE_HASHES] = {moved.get(k, k): v for k, v in hashes.items()}
            for name, text in (("report.json", json.dumps(report, indent=2) + "\n"),
                               (MANIFEST, json.dumps(manifest, indent=2) + "\n")):
                (staged / name).unlink(missing_ok=True)  # a hard link: never write through it
                (staged / name).write_text(text)
            _refresh_verify_dirs(staged, key, top, old_dir)
            try:
                device = read_folder_json(staged, DEVICE_REPORT, missing_ok=True)
            except ConfigError:
                device = None  # a report that cannot be read is left out of the renderings, as no report
            device = device if isinstance(device, dict) else None
            for name in ("report.md", "report.html"):
                (staged / name).unlink(missing_ok=True)

            (staged / "report.md").write_text(Report.from_dict(report).to_markdown(device))
            (staged / "report.html").write_text(render_html(report, device))

            (staged / README).unlink(missing_ok=True)
            (staged / README).write_text(render_readme(report, manifest, staged))
            move_into_place(staged, out)
    return f"moved {key} to the top level of {out}; {top} is now in {old_dir}"


def _check_bundle_dirs(out: Path, bundle: dict) -> None:
    """ConfigError unless every bundle path is ``bundle/<folder>`` exactly, each its own, each a folder
    (no symlink): ``"bundle"`` itself would move every candidate to the top level."""
    seen = set()
    for name, where in bundle.items():
        path = contained_path(out, where, named_in=f"{MANIFEST} bundle")
        if not is_bundle_dir(where):
            raise ConfigError(f"{out / MANIFEST} puts {name} in {shown(where)}; dlopt writes bundle/<folder> (one "
                              f"folder under bundle/): nothing was moved, recompile it")
        if where in seen:
            raise ConfigError(f"{out / MANIFEST} puts two candidates in {where}; nothing was moved, recompile it")
        seen.add(where)
        if not path.is_dir():
            raise ConfigError(f"{out / MANIFEST} puts {name} in {where}, which is not a folder; nothing was moved, "
                              f"recompile it")


def _report_rows(out: Path, report: dict, keys) -> dict:
    """report.json's candidate rows by key; ConfigError if they or any of ``keys`` are missing."""
    candidates = report.get("candidates")
    rows = {f"{c.get('backend')}/{c.get('precision')}": c for c in candidates if isinstance(c, dict)} \
        if isinstance(candidates, list) else {}
    missing = [k for k in keys if k not in rows]
    if missing:
        raise ConfigError(f"{out / 'report.json'} has no row for {missing[0]}; nothing was moved, recompile it")
    return rows


def _no_symlinks_in(path: Path, out: Path) -> None:
    """ConfigError when ``path`` is or holds a symlink (dlopt writes none; a link would be followed)."""
    inside = path.rglob("*") if path.is_dir() and not path.is_symlink() else ()
    link = next((p for p in (path, *inside) if p.is_symlink()), None)
    if link is not None:
        raise ConfigError(f"{out} holds the symlink {link.relative_to(out).as_posix()}, which dlopt never writes; "
                          f"nothing was moved: remove it or recompile")


def _refresh_verify_dirs(staged: Path, key: str, top: str, old_dir: str) -> None:
    """verify.npz names each candidate's folder: rewrite its meta for the new layout."""
    import numpy as np

    path = staged / VERIFY_FILE
    try:
        arrays = read_arrays(path)
        meta = json.loads(str(arrays["meta"]))
        candidates = meta["candidates"]
        for name, where in ((key, "."), (top, old_dir)):
            if isinstance(candidates.get(name), dict):
                candidates[name]["dir"] = where
    except (VerifyFileError, KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ConfigError(f"{path.name} of {staged.name} cannot be rewritten for the new layout: {first_line(exc)}; "
                          f"recompile") from exc
    meta["top_level"] = key
    arrays["meta"] = np.array(json.dumps(meta))
    path.unlink()
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
