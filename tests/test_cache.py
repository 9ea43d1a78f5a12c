"""Cached artefacts are reused only when their files still match their hashes."""

from __future__ import annotations

import hashlib
import json
import stat

import models
import pytest
from cli import dlopt as dlopt_cli

import dlopt
from dlopt.flow.cache import ArtifactCache, CacheEventKind


# The cache's policy is the same for every backend: ONNX Runtime alone is built (the default cpu target also
# builds OpenVINO and TVM, ~3x the CPU); three precisions give the three entries the malformed-index test needs.
HERE = '[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32", "fp16", "int8"]\n'


def _targets(tmp_path):
    path = tmp_path / "here.toml"
    path.write_text(HERE)
    return path


def _compile(tmp_path, name, cache_root, monkeypatch, precision="fp32"):
    monkeypatch.setenv("DLOPT_CACHE", str(cache_root))
    return dlopt.compile(models.conv_bn_relu(), out=tmp_path / name, target="here", targets_file=_targets(tmp_path),
                         precision=precision, runs=3, warmup=1, max_accuracy_drop=100.0)


def _entry_inodes(root) -> dict:
    """Each cache entry's folder and index, as (inode, mtime) pairs: put() replaces both."""
    return {str(p): [(s.st_ino, s.st_mtime_ns) for s in (p.stat(), (p / "entry.json").stat())]
            for p in root.glob("*/*") if (p / "entry.json").is_file()}


def test_damaged_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first = _compile(tmp_path, "a", root, monkeypatch)
    entries = [p for p in root.glob("*/*") if (p / "entry.json").is_file()
               and json.loads((p / "entry.json").read_text())["meta"]["backend"] == "ort"]
    assert len(entries) == 1
    files = json.loads((entries[0] / "entry.json").read_text())["files"]
    assert set(files) == {"model.onnx", "session_options.json"}

    # a hit gives the same artefact without building it again: a build ends in put(), which renames a
    # new folder over the entry, so every entry keeping its inode shows that nothing was rebuilt
    stored = _entry_inodes(root)
    second = _compile(tmp_path, "b", root, monkeypatch)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert _entry_inodes(root) == stored
    assert not any("damaged" in n for n in second.notes)

    # corrupt the cached model: it must not be used, and the entry is rebuilt
    cached = entries[0] / "model.onnx"
    cached.write_bytes(cached.read_bytes()[:-7] + b"garbage")
    third = _compile(tmp_path, "c", root, monkeypatch)
    assert any("damaged (model.onnx) and rebuilt" in n for n in third.notes)
    assert (tmp_path / "c" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()
    assert third.chosen_candidate().fidelity.max_rel_error <= 1e-4
    rebuilt = json.loads((entries[0] / "entry.json").read_text())["files"]
    assert rebuilt == files  # the entry holds the good build again
    assert first.chosen == second.chosen == third.chosen == "ort/fp32"


def test_missing_index_is_a_miss(tmp_path):
    cache = ArtifactCache(tmp_path)
    assert cache.get("ab" * 32, tmp_path / "dest") is None and cache.events == []


# -- what the cache trusts -------------------------------------------------------------------

KEY = "cd" * 32
META = {"backend": "ort", "precision": "fp32", "files": ["a.bin"], "entry": "a.bin"}


def _entry_of(root, backend="ort"):
    found = [p for p in root.glob("*/*") if (p / "entry.json").is_file()
             and json.loads((p / "entry.json").read_text())["meta"]["backend"] == backend]
    assert len(found) == 1
    return found[0]


def _stored(tmp_path):
    """A cache in tmp_path/cache holding one honest entry (KEY) with the file a.bin."""
    src = tmp_path / "build"
    src.mkdir()
    (src / "a.bin").write_bytes(b"honest")
    cache = ArtifactCache(tmp_path / "cache")
    cache.put(KEY, src, ["a.bin"], META)
    return cache, tmp_path / "cache" / KEY[:2] / KEY


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_created_root_and_entry_folders_are_private(tmp_path):
    cache, entry = _stored(tmp_path)
    for folder in (cache.root, entry.parent, entry):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert cache.get(KEY, tmp_path / "dest") == META
    assert (tmp_path / "dest" / "a.bin").read_bytes() == b"honest" and [(e.kind, str(e)) for e in cache.events] == [(CacheEventKind.HIT, f"cache hit {KEY[:12]}")]


def test_planted_traversal_name_writes_nothing_outside(tmp_path):
    cache, entry = _stored(tmp_path)
    # Before the fix, entry/NAME was copied to dest/NAME: tmp/src/pwned.sh -> tmp/w/src/pwned.sh.
    payload = b"#!/bin/sh\ntouch pwned\n"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pwned.sh").write_bytes(payload)
    (tmp_path / "w" / "src").mkdir(parents=True)
    name = "../../../src/pwned.sh"
    index = json.loads((entry / "entry.json").read_text())
    index["files"][name] = _sha(payload)
    index["meta"]["files"].append(name)
    (entry / "entry.json").write_text(json.dumps(index))
    dest = tmp_path / "w" / "x" / "y" / "dest"

    assert cache.get(KEY, dest) is None
    assert not (tmp_path / "w" / "src" / "pwned.sh").exists()
    assert not dest.exists() or list(dest.iterdir()) == []
    assert (tmp_path / "src" / "pwned.sh").read_bytes() == payload  # outside the entry: not deleted
    assert not entry.exists()  # the entry itself is ours and damaged: removed so it is rebuilt
    assert "is not a map of plain file names" in cache.events[-1].message and cache.events[-1].kind is CacheEventKind.DAMAGED


@pytest.mark.parametrize("index", [
    [], {"files": [1, 2]}, {"files": {"a.bin": 5}, "meta": META}, {"files": {"a.bin": "ab"}, "meta": META},
    {"files": {"a.bin": "0" * 64}, "meta": []}, {"files": {"/etc/a.bin": "0" * 64}, "meta": META},
    {"files": {"a.bin": "0" * 64}, "meta": {**META, "folder": "/"}},
    {"files": {"a.bin": "0" * 64}, "meta": {**META, "files": ["b.bin"]}},
    {"files": {"a.bin": "0" * 64}, "meta": {**META, "entry": "../a.bin"}},
], ids=["list", "files-list", "digest-int", "digest-short", "meta-list", "absolute-name", "meta-folder",
        "meta-files-differ", "meta-entry-elsewhere"])
def test_index_of_the_wrong_shape_is_damaged(tmp_path, index):
    cache, entry = _stored(tmp_path)
    (entry / "entry.json").write_text(json.dumps(index))
    assert cache.get(KEY, tmp_path / "dest") is None
    assert not entry.exists() and "damaged (entry.json: " in cache.events[-1].message


def test_symlinked_file_in_an_entry_is_refused(tmp_path):
    cache, entry = _stored(tmp_path)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"honest")  # same bytes, same sha256: only the link itself is wrong
    (entry / "a.bin").unlink()
    (entry / "a.bin").symlink_to(outside)
    assert cache.get(KEY, tmp_path / "dest") is None
    assert not (tmp_path / "dest" / "a.bin").exists()
    assert outside.read_bytes() == b"honest" and "damaged (a.bin: " in cache.events[-1].message


def _poison(entry):
    """What someone who can write the entry can do: swap the model and fix its hash."""
    model = models.conv_bn_relu(seed=1).SerializeToString()
    (entry / "model.onnx").write_bytes(model)
    index = json.loads((entry / "entry.json").read_text())
    index["files"]["model.onnx"] = _sha(model)
    (entry / "entry.json").write_text(json.dumps(index))
    return model


@pytest.mark.parametrize("loosened", ["root", "entry"])
def test_group_writable_cache_is_ignored_not_used_nor_deleted(tmp_path, monkeypatch, caplog, loosened):
    root = tmp_path / "cache"
    _compile(tmp_path, "a", root, monkeypatch)
    entry = _entry_of(root)
    key = entry.name
    poisoned = _poison(entry)
    assert ArtifactCache(root).get(key, tmp_path / "probe") is not None  # hashes alone let it through
    folder = root if loosened == "root" else entry
    folder.chmod(0o775)

    report = _compile(tmp_path, "b", root, monkeypatch)
    assert report.chosen == "ort/fp32"
    built = (tmp_path / "b" / "model.onnx").read_bytes()
    assert built == (tmp_path / "a" / "model.onnx").read_bytes() and built != poisoned
    assert (entry / "model.onnx").read_bytes() == poisoned  # not ours to delete
    assert stat.S_IMODE(folder.stat().st_mode) == 0o775
    warned = [r.getMessage() for r in caplog.records if r.name == "dlopt.flow.cache" and r.levelname == "WARNING"]
    assert len([w for w in warned if str(folder) in w]) == 1, warned
    assert "writable by group or others (mode 775)" in warned[0]

    cache = ArtifactCache(root)
    assert cache.get(key, tmp_path / "dest") is None and not (tmp_path / "dest").exists()
    assert [(e.kind, e.message) for e in cache.events] == [
        (CacheEventKind.IGNORED, f"cache {loosened} {folder} ignored (writable by group or others (mode 775)); "
                                 "built afresh without it")]
    assert cache.warnings == [e.message for e in cache.events]


def test_malformed_indexes_are_rebuilt_and_the_compile_exits_0(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    _compile(tmp_path, "a", root, monkeypatch, precision="auto")
    entries = sorted(p for p in root.glob("*/*") if (p / "entry.json").is_file())
    assert len(entries) == 3  # ort at fp32, fp16 and int8
    # Each of these made every later compile exit 70 before.
    for entry, bad in zip(entries, ['{"files": [1, 2]}', "[]", '{"files": {"a": 5}}'], strict=True):
        (entry / "entry.json").write_text(bad)
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    result = dlopt_cli("compile", model, "-o", tmp_path / "b", "--target", "here", "--targets-file", _targets(tmp_path),
                       "--precision", "auto", "--runs", "3", "--warmup", "1", "--max-accuracy-drop", "100",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    chosen = [json.loads((tmp_path / o / "report.json").read_text())["chosen"] for o in ("a", "b")]
    if chosen[0] == chosen[1]:  # timing may pick another of the equally fast float candidates
        assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()
    for entry in entries:  # rebuilt: each holds a well-formed index again
        index = json.loads((entry / "entry.json").read_text())
        assert list(index["files"]) == index["meta"]["files"]


def test_cache_key_covers_dlopt_own_source():
    """An artefact built by other dlopt code (a dev checkout, an edited install) is not reused."""
    import hashlib
    from pathlib import Path

    import dlopt
    from dlopt import calibration, passes, targets
    from dlopt.flow.cache import code_fingerprint

    digest = hashlib.sha256()
    for package in (dlopt, passes, targets, calibration):
        folder = Path(package.__file__).parent
        for source in sorted(folder.rglob("*.py")):  # the sub-packages too
            digest.update(source.relative_to(folder).as_posix().encode() + source.read_bytes())
    assert code_fingerprint() == digest.hexdigest()
