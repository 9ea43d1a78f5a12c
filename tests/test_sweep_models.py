"""Issue 24 item 3: a sweep of unlike models (a CNN taking ``x``, an encoder taking ``input_ids`` and
``attention_mask``) passes with per-model tables; global options alone broke one of the two ("--shape names
attention_mask, input_ids, which the model does not take").  Bad per-model tables are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

import models
from cli import dlopt
from dlopt.core.config import machine_cores
from dlopt.core.errors import ConfigError
from dlopt.workflows.sweep import load_sweep
from masked import padded_tokens, token_encoder
from serving import dlopt_here

TARGETS = '[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n'
HEAD = """
[sweep]
models = ["cnn.onnx", "encoder.onnx"]
targets = ["here"]
out = "nightly"
targets-file = "targets.toml"

[options]             # every model
runs = 5
warmup = 1
samples = 4
"""
MODEL_TABLES = """
[models.cnn]          # cnn.onnx only: x [N, 3, 16, 16]
shapes = {x = [2, 3, 16, 16]}
max-accuracy-drop = 2.0

[models.encoder]      # encoder.onnx only: input_ids, attention_mask [batch, seq]
shapes = {input_ids = [1, 32], attention_mask = [1, 32]}
inputs = "tokens.npz"
metric = "cosine"
calib-samples = 8
"""
VARIANTS = """
[variants.fp32]
precision = "fp32"
"""


def _write(root, text=HEAD + MODEL_TABLES + VARIANTS):
    models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx")
    token_encoder(root / "encoder.onnx")
    ids, mask = padded_tokens(4, 32)
    np.savez(root / "tokens.npz", input_ids=ids, attention_mask=mask)
    (root / "targets.toml").write_text(TARGETS)
    (root / "sweep.toml").write_text(text)
    return root / "sweep.toml"


def test_a_cnn_and_an_encoder_sweep_with_their_own_options(tmp_path, monkeypatch):
    monkeypatch.delenv("DLOPT_THREADS", raising=False)  # the default, all cores: a task's one CPU must not shrink it
    _write(tmp_path)  # and -o, as the README has it, replaces [sweep] out
    done = dlopt("sweep", "sweep.toml", "-o", "build/nightly", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "nightly").exists()
    out = tmp_path / "build" / "nightly"
    rows = json.loads(done.stdout)["entries"]
    cores = machine_cores()
    assert [(r["model"], r["status"], r["chosen"], r["threads"]) for r in rows] == [
        ("cnn", "ok", "ort/fp32", cores), ("encoder", "ok", "ort/fp32", cores)]
    reports = {m: json.loads((out / m / "here" / "fp32" / "report.json").read_text()) for m in ("cnn", "encoder")}
    manifests = {m: json.loads((out / m / "here" / "fp32" / "manifest.json").read_text()) for m in ("cnn", "encoder")}
    assert reports["cnn"]["timing"]["shapes"] == {"x": [2, 3, 16, 16]}
    assert reports["encoder"]["timing"]["shapes"] == {"input_ids": [1, 32], "attention_mask": [1, 32]}
    assert reports["encoder"]["evaluation"]["source"].endswith("tokens.npz")
    assert reports["encoder"]["budget"]["metric"].startswith("cosine similarity")
    assert manifests["cnn"]["options"]["max_accuracy_drop"] == 2.0
    assert manifests["encoder"]["options"]["max_accuracy_drop"] == 1.0  # the default: cnn's table is cnn's only
    assert (manifests["cnn"]["options"]["calib_samples"], manifests["encoder"]["options"]["calib_samples"]) == (256, 8)
    assert manifests["encoder"]["options"]["metric"] == "cosine" and manifests["cnn"]["options"]["metric"] is None
    for model in ("cnn", "encoder"):  # a cpu artefact runs with this machine's cores
        settings = json.loads((out / model / "here" / "fp32" / "session_options.json").read_text())
        assert settings["intra_op_num_threads"] == cores and manifests[model]["options"]["threads"] == cores


@pytest.mark.parametrize("table, message", [
    ("[models.cnn]\nrunz = 5\n", r"\[models.cnn\] has unknown option 'runz'; known: .*"),
    ("[models.bert]\nruns = 5\n", r"\[models.bert\] names no model of this sweep \(its models: cnn, encoder; a "
                                  r"model's table is named after its file's stem\)"),
    ('[models.cnn]\nruns = "five"\n', r"\[models.cnn\]: runs must be an integer, got str 'five'"),
    ("[models.encoder]\nshapes = [1, 32]\n", r"\[models.encoder\]: shapes must be a dict of input name -> shape"),
    ('[models.cnn]\nmetric = "top2"\n', r"\[models.cnn\]: metric takes top1, cosine, rel-error or module:function"),
    ("[models]\ncnn = 5\n", r"\[models.cnn\] must be a table of compile options"),
    ('[models.cnn]\nprecision = "int8"\n', r"\[models.cnn\] and \[variants.fp32\] both set precision"),
])
def test_a_bad_model_table_is_refused(tmp_path, table, message):
    sweep = _write(tmp_path, HEAD + table + VARIANTS)
    with pytest.raises(ConfigError, match=message):
        load_sweep(sweep)


def test_a_bad_global_option_is_named_as_in_options_not_in_the_model_table_checked_with_it(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.toml: \[options\]: seed must be an integer, got str 'x'"):
        load_sweep(_write(tmp_path, HEAD.replace("samples = 4", 'samples = 4\nseed = "x"') + MODEL_TABLES + VARIANTS))


def test_a_bad_model_table_is_one_line_exit_2_before_any_compile(tmp_path):
    sweep = _write(tmp_path, HEAD + MODEL_TABLES.replace("max-accuracy-drop", "max-accuracy-dorp") + VARIANTS)
    status, stderr = dlopt_here("sweep", sweep)  # in this process: the CLI's check, message and exit code
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "sweep.toml: [models.cnn] has unknown option 'max-accuracy-dorp'" in stderr
    assert not (tmp_path / "nightly").exists()
