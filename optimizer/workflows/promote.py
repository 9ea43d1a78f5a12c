"""``dlopt bench --select``: move a bundle candidate to the top level of an output, and the top-level one into bundle/.

Works on a hard-linked copy of the output and renames it into place, so the folder is either as it
was or wholly re-laid out.  Every path the manifest names is checked first (inside the output, no
symlink, each bundle candidate in its own ``bundle/<folder>``): a crafted manifest moves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dlopt.core.artifacts import (FILE_HASHES, MANIFEST, contained_path, move_into_place, output_lock, read_folder_json,
                                  resolve_output, staging_dir)
from dlopt.core.errors import ConfigError, first_line
from dlopt.device.device_check import DEVICE_REPORT, VERIFY_FILE, VerifyFileError, is_bundle_dir, read_arrays, shown
from dlopt.report.data import Report
from dlopt.report.html import render_html
from dlopt.report.readme import README, render_readme
from dlopt.targets import read_manifest


@dataclass(frozen=True)
class _Move:
    """What ``select`` moves, every path in it checked: ``key`` from ``new_dir`` up, ``top`` down to ``old_dir``."""

    key: str
    top: str
    new_dir: str
    old_dir: str
    old_files: list[str]  # the top-level candidate's files, and the ONNX it was built from
    published: list[str]
    bundle: dict  # the manifest's bundle without ``key``
    manifest: dict
    report: dict
    rows: dict  # report.json's candidate rows by key


def select(out: Path, key: str) -> str:
    """Move candidate ``key`` from bundle/ to the top level of ``out`` and the top-level one into bundle/.

    Returns a line saying what moved."""
    out = resolve_output(Path(out))
    with output_lock(out):
        manifest = read_manifest(out)
        if manifest is None or not all(isinstance(manifest.get(k), str) for k in ("backend", "precision")):
            raise ConfigError(f"{out} is not a dlopt output folder (no dlopt manifest.json)")
        top = f"{manifest['backend']}/{manifest['precision']}"
        if key == top:
            return f"{key} is already at the top level of {out}"
        move = _plan(out, manifest, key, top)
        with staging_dir(out) as staged:
            _link_published(out, staged, move.published)
            new_files = _swap_files(staged, move)
            _rewrite_records(staged, move, new_files)
            move_into_place(staged, out)
    return f"moved {key} to the top level of {out}; {top} is now in {move.old_dir}"


def _plan(out: Path, manifest: dict, key: str, top: str) -> _Move:
    """The move, once every path it touches is checked; ConfigError (nothing moved) otherwise."""
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
    clash = next((p.name for p in (out / new_dir).iterdir() if p.name in published and p.name not in old_files), None)
    if clash is not None:  # a bundle/<folder>/bundle or manifest.json would land on the output's own
        raise ConfigError(f"{new_dir} holds {clash}, which --select would move onto the output's own; nothing "
                          f"was moved, recompile it")
    return _Move(key, top, new_dir, old_dir, old_files, published, bundle, manifest, report, rows)


def _link_published(out: Path, staged: Path, published: list[str]) -> None:
    """Hard links of what the output publishes in ``staged`` (never copies, never symlinks)."""
    for name in published:
        source = out / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, staged / name, copy_function=os.link)
        elif source.is_file() and not source.is_symlink():
            os.link(source, staged / name)


def _swap_files(staged: Path, move: _Move) -> list[str]:
    """The top-level files down into ``old_dir``, ``new_dir``'s up; the new top-level file names."""
    (staged / move.old_dir).mkdir()
    for f in move.old_files:
        os.replace(staged / f, staged / move.old_dir / f)
    new_files = sorted(p.name for p in (staged / move.new_dir).iterdir())
    for f in new_files:
        os.replace(staged / move.new_dir / f, staged / f)
    (staged / move.new_dir).rmdir()
    return new_files


def _rewrite_records(staged: Path, move: _Move, new_files: list[str]) -> None:
    """report.json, the manifest, verify.npz, report.md/.html and the README for the new layout."""
    key, top, old_dir, new_dir, report, rows = move.key, move.top, move.old_dir, move.new_dir, move.report, move.rows
    bundle = {**move.bundle, top: old_dir}
    rows[top]["artifact_dir"], rows[key]["artifact_dir"] = old_dir, "."
    rows[top]["chosen"], rows[key]["chosen"] = False, report.get("chosen") is not None
    report["chosen"] = key if report.get("chosen") is not None else None
    report["notes"] = [*report.get("notes", []), f"dlopt bench --select moved {key} to the top level "
                                                  f"(it was in {new_dir}; {top} is now in {old_dir})"]
    manifest = move.manifest
    backend, precision = key.split("/", 1)
    manifest.update(backend=backend, precision=precision, files=new_files, bundle=bundle)
    hashes = manifest.get(FILE_HASHES)
    if isinstance(hashes, dict):  # the published hashes follow their files (never re-hashed here)
        moved = {f: f"{old_dir}/{f}" for f in move.old_files} | {f"{new_dir}/{f}": f for f in new_files}
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
    for name in ("report.md", "report.html", README):
        (staged / name).unlink(missing_ok=True)
    (staged / "report.md").write_text(Report.from_dict(report).to_markdown(device))
    (staged / "report.html").write_text(render_html(report, device))
    (staged / README).write_text(render_readme(report, manifest, staged))


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
