"""Cached artefacts are reused only when their files still match their hashes."""

from __future__ import annotations

import json

import models

import dlopt
from dlopt.cache import ArtifactCache


def _compile(tmp_path, name, cache_root, monkeypatch):
    monkeypatch.setenv("DLOPT_CACHE", str(cache_root))
    return dlopt.compile(models.conv_bn_relu(), out=tmp_path / name, precision="fp32", runs=3)


def test_damaged_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first = _compile(tmp_path, "a", root, monkeypatch)
    entries = [p for p in root.glob("*/*") if (p / "entry.json").is_file()
               and json.loads((p / "entry.json").read_text())["meta"]["backend"] == "ort"]
    assert len(entries) == 1
    files = json.loads((entries[0] / "entry.json").read_text())["files"]
    assert set(files) == {"model.onnx", "session_options.json"}

    # a hit gives the same artefact
    second = _compile(tmp_path, "b", root, monkeypatch)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert not any("damaged" in n for n in second.notes)

    # corrupt the cached model: it must not be used, and the entry is rebuilt
    cached = entries[0] / "model.onnx"
    cached.write_bytes(cached.read_bytes()[:-7] + b"garbage")
    third = _compile(tmp_path, "c", root, monkeypatch)
    assert any("damaged (model.onnx) and rebuilt" in n for n in third.notes)
    assert (tmp_path / "c" / "model.onnx").read_bytes() == (tmp_path / "a" / "model.onnx").read_bytes()
    assert third.chosen_candidate().fidelity["max_rel_error"] <= 1e-4
    rebuilt = json.loads((entries[0] / "entry.json").read_text())["files"]
    assert rebuilt == files  # the entry holds the good build again
    assert first.chosen == second.chosen == third.chosen == "ort/fp32"


def test_missing_index_is_a_miss(tmp_path):
    cache = ArtifactCache(tmp_path)
    assert cache.get("ab" * 32, tmp_path / "dest") is None and cache.events == []
