"""Sweeps: a sweep of two unlike models (a CNN taking x, an encoder taking input_ids and attention_mask, with
its own shapes) as tasks of a real local Ray (2 CPUs), then resumed sequentially with a broken third model
whose failure does not stop the others."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import models
from dlopt.core.config import machine_cores
from dlopt.core.errors import CompileError, ConfigError
from dlopt.workflows.sweep import load_sweep, run_sweep
from dlopt.cli.sweep import sweep
from masked import token_encoder

TARGETS = """
[targets.here]
base = "cpu"
backends = ["ort"]
precisions = ["fp32"]
"""

SWEEP = """
[sweep]
models = [{models}]
targets = ["here"]
out = "nightly"
targets-file = "targets.toml"

[options]
runs = 5
warmup = 1
samples = 4

{tables}
[variants.fp32]
precision = "fp32"
"""
ENCODER = '[models.encoder]\nshapes = {input_ids = [1, 32], attention_mask = [1, 32]}\n'


def _write(root, names) -> None:
    (root / "targets.toml").write_text(TARGETS)
    (root / "sweep.toml").write_text(SWEEP.replace("{models}", ", ".join(f'"{n}"' for n in names)).replace(
        "{tables}", ENCODER if "encoder.onnx" in names else ""))


def test_sweep_on_ray_then_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("DLOPT_THREADS", raising=False)  # the default, all cores: a task's one CPU must not shrink it
    ray = pytest.importorskip("ray", reason="sweeps on Ray need ray (pip install 'dlopt[ray]')")
    models.save(models.conv_bn_relu(batch="N"), tmp_path / "cnn.onnx")
    token_encoder(tmp_path / "encoder.onnx")
    _write(tmp_path, ["cnn.onnx", "encoder.onnx"])

    result = run_sweep(load_sweep(tmp_path / "sweep.toml"), ray=True, num_cpus=2)
    assert not ray.is_initialized()  # the local Ray it started was stopped
    assert result.mode == "ray (local)"
    # one task per core; each artefact (and its timing) has this machine's cores, not the task's one CPU
    cores = machine_cores()
    assert [(r.model, r.status, r.chosen, r.threads) for r in result.rows] == [
        ("cnn", "ok", "ort/fp32", cores), ("encoder", "ok", "ort/fp32", cores)]
    table = json.loads((tmp_path / "nightly" / "sweep.json").read_text())
    assert table["mode"] == "ray (local)" and table["wall_seconds"] == result.wall_seconds
    for row in table["entries"]:
        report = json.loads((tmp_path / "nightly" / row["model"] / "here" / "fp32" / "report.json").read_text())
        chosen = next(c for c in report["candidates"] if c["chosen"])
        assert row["p50_ms"] == chosen["measurement"]["latency"]["p50_ms"]
        assert row["size_bytes"] == chosen["measurement"]["size_bytes"]
        folder = tmp_path / "nightly" / row["model"] / "here" / "fp32"
        assert json.loads((folder / "session_options.json").read_text())["intra_op_num_threads"] == cores
        assert json.loads((folder / "manifest.json").read_text())["options"]["threads"] == cores
    assert report["timing"]["shapes"] == {"input_ids": [1, 32], "attention_mask": [1, 32]}  # its own table
    markdown = (tmp_path / "nightly" / "sweep.md").read_text()
    assert "2 entries (2 ok); ray (local)" in markdown and "| cnn " in markdown and "| encoder " in markdown

    # resume: the two finished entries are not compiled again; a broken model fails alone
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    _write(tmp_path, ["cnn.onnx", "encoder.onnx", "broken.onnx"])
    before = (tmp_path / "nightly" / "cnn" / "here" / "fp32" / "manifest.json").stat().st_mtime_ns
    run = CliRunner().invoke(sweep, [str(tmp_path / "sweep.toml")])
    assert isinstance(run.exception, CompileError) and run.exception.exit_code == 3
    assert "1 of 3 sweep entries failed: broken/here/fp32" in str(run.exception)
    assert (tmp_path / "nightly" / "cnn" / "here" / "fp32" / "manifest.json").stat().st_mtime_ns == before
    rows = json.loads((tmp_path / "nightly" / "sweep.json").read_text())["entries"]
    assert [(r["model"], r["status"]) for r in rows] == [("cnn", "done"), ("encoder", "done"), ("broken", "failed")]
    assert "ModelError" in rows[2]["note"]
    assert not (tmp_path / "nightly" / "broken" / "here" / "fp32").exists()  # nothing half-written

    # an option changed in sweep.toml since, in cnn's own table: cnn is compiled again, encoder is still done
    _write(tmp_path, ["cnn.onnx", "encoder.onnx"])
    (tmp_path / "sweep.toml").write_text((tmp_path / "sweep.toml").read_text() + "[models.cnn]\nruns = 6\n")
    again = run_sweep(load_sweep(tmp_path / "sweep.toml"))
    assert [(r.model, r.status) for r in again.rows] == [("cnn", "ok"), ("encoder", "done")]
    manifests = [json.loads((tmp_path / "nightly" / m / "here" / "fp32" / "manifest.json").read_text())
                 for m in ("cnn", "encoder")]
    assert [m["options"]["runs"] for m in manifests] == [6, 5]


def test_bad_sweep_files(tmp_path):
    models.save(models.conv_bn_relu(batch="N"), tmp_path / "cnn.onnx")
    _write(tmp_path, ["cnn.onnx"])
    text = (tmp_path / "sweep.toml").read_text()
    (tmp_path / "sweep.toml").write_text(text.replace("runs = 5", "runz = 5"))
    with pytest.raises(ConfigError, match="unknown option 'runz'"):
        load_sweep(tmp_path / "sweep.toml")
    (tmp_path / "sweep.toml").write_text(text.replace("runs = 5", "runs = 0"))
    with pytest.raises(ConfigError, match=r"\[options\]: runs must be at least 1"):
        load_sweep(tmp_path / "sweep.toml")
    (tmp_path / "sweep.toml").write_text(text.replace('targets = ["here"]', 'targets = ["hear"]'))
    with pytest.raises(ConfigError, match="unknown target 'hear'"):
        load_sweep(tmp_path / "sweep.toml")
    (tmp_path / "sweep.toml").write_text(text.replace('"cnn.onnx"', '"missing.onnx"'))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "sweep.toml")
    (tmp_path / "sweep.toml").write_text(text)
    (tmp_path / "nightly").mkdir()
    (tmp_path / "nightly" / "sweep.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match="not a sweep table dlopt wrote"):
        run_sweep(load_sweep(tmp_path / "sweep.toml"))
    assert (tmp_path / "nightly" / "sweep.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in (tmp_path / "nightly").iterdir()) == ["sweep.json"]  # nothing compiled
