"""Models whose weights live in an external data file compile from any working directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import dlopt
import models
from cli import dlopt as run_cli
from dlopt.core.model_io import load_ir, save_ir
from dlopt.passes import SimplifyPass
from dlopt.flow.ranges import compute_ranges

EXTERNAL_DATA_ERRORS = ("external data", "not regular file", "does not exist")


@pytest.fixture
def cnn(tmp_path):
    """The small CNN with every tensor in ``cnn.onnx.data``, in its own folder."""
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "cnn.onnx"
    onnx.save(models.conv_bn_relu(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="cnn.onnx.data", size_threshold=0)
    assert not onnx.load(path, load_external_data=False).graph.initializer[0].raw_data  # really external
    (tmp_path / "elsewhere").mkdir()
    return path


def _run(path, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _check_result(out, chosen, original):
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == chosen
    # a backend that builds from a PyTorch module only (ExecuTorch) refuses any .onnx, external data or not
    built = [c for c in report["candidates"] if c["status"] != "unavailable"
             and not (c["status"] == "unsupported" and "PyTorch module" in (c.get("reason") or ""))]
    assert built
    for cand in built:
        reason = (cand.get("reason") or "").lower()
        assert cand["status"] in ("ok", "rejected"), cand
        assert not any(word in reason for word in EXTERNAL_DATA_ERRORS), cand
    feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    (want,), (got,) = _run(original, feed), _run(out / "model.onnx", feed)
    assert float(np.max(np.abs(want - got))) < 1e-5
    return report


def test_cli_fp32_with_a_relative_path_from_another_folder(cnn, tmp_path):
    # ONNX Runtime alone: the path is the CLI's to resolve; every CPU backend reads the same relative path in
    # test_api_from_another_working_directory and the data file in test_cli_auto_calibrates_int8_with_an_absolute_path
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    result = run_cli("compile", "../models/cnn.onnx", "--precision", "fp32", "-o", "out", "--runs", "5", "--warmup",
                     "1", "--target", "here", "--targets-file", tmp_path / "t.toml", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "elsewhere" / "out"
    report = _check_result(out, "ort/fp32", cnn)
    assert {c["backend"] for c in report["candidates"] if c["status"] == "ok"} >= {"ort"}
    assert not (out / "cnn.onnx.data").exists()  # the artefact carries its weights itself


def test_cli_auto_calibrates_int8_with_an_absolute_path(cnn, tmp_path):
    # the two backends that calibrate int8 themselves (ONNX Runtime's quantiser, OpenVINO's NNCF), every precision;
    # TVM builds from the same external data in test_api_from_another_working_directory
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort", "openvino"]\n')
    result = run_cli("compile", cnn, "-o", tmp_path / "out", "--runs", "5", "--warmup", "1", "--target", "here",
                     "--targets-file", tmp_path / "t.toml", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    report = _check_result(tmp_path / "out", "ort/fp32", cnn)
    assert report["calibration"]["samples"] == 256
    int8 = [c for c in report["candidates"] if c["precision"] == "int8" and c["status"] != "unsupported"]
    assert {c["backend"] for c in int8} == {"ort", "openvino"}
    assert all(c["score"] is not None for c in int8)  # built, run and scored


def test_api_from_another_working_directory(cnn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    report = dlopt.compile("../models/cnn.onnx", out="out", precision="fp32", runs=10, warmup=2)
    assert report.chosen == "ort/fp32"
    _check_result(tmp_path / "elsewhere" / "out", "ort/fp32", cnn)


def test_small_external_data_is_read_into_memory(cnn, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = load_ir(Path(os.path.relpath(cnn)))  # "../models/cnn.onnx"
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    (tmp_path / "models" / "cnn.onnx.data").unlink()  # nothing reads it any more
    files = save_ir(model, tmp_path / "copy.onnx")
    assert files == [tmp_path / "copy.onnx"]  # one self-contained file
    feed = {"x": np.ones((1, 3, 16, 16), np.float32)}
    np.testing.assert_array_equal(_run(files[0], feed)[0], _run_proto(models.conv_bn_relu(), feed)[0])


def _lazy_model(path, tmp_path, monkeypatch) -> ir.Model:
    """What load_ir keeps for a model over 1 GiB (the limit lowered here): initializers still in the file."""
    monkeypatch.setattr("dlopt.core.model_io.EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.chdir(tmp_path / "elsewhere")
    model = load_ir(Path(os.path.relpath(path)))
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    return model


def test_weights_left_in_the_data_file_are_copied_when_saved(cnn, tmp_path, monkeypatch):
    model = _lazy_model(cnn, tmp_path, monkeypatch)
    target = tmp_path / "saved"
    target.mkdir()
    files = save_ir(model, target / "model.onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    shutil.rmtree(tmp_path / "models")  # the copy must not point back at the original's files
    feed = {"x": np.ones((1, 3, 16, 16), np.float32)}
    (got,) = _run(target / "model.onnx", feed)
    (want,) = _run_proto(models.conv_bn_relu(), feed)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_constant_attributes_of_a_large_model_are_read_and_saved_inline(tmp_path, monkeypatch):
    original = models.conv_bn_relu()
    for node in original.graph.node:  # the bias as a Constant node: its tensor is an attribute
        if node.op_type == "Add":
            bias = next(t for t in original.graph.initializer if t.name == node.input[1])
            original.graph.initializer.remove(bias)
            original.graph.node.insert(0, onnx.helper.make_node("Constant", [], [bias.name], value=bias))
            break
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = folder / "m.onnx"
    external = onnx.ModelProto()
    external.CopyFrom(original)  # onnx.save moves the tensors of the proto it saves
    onnx.save(external, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0,
              convert_attribute=True)
    constant = onnx.load(path, load_external_data=False).graph.node[0].attribute[0].t
    assert constant.data_location == onnx.TensorProto.EXTERNAL
    model = _lazy_model(path, tmp_path, monkeypatch)
    assert not isinstance(model.graph.node(0).attributes["value"].value, ir.ExternalTensor)  # read into memory
    save_ir(model, tmp_path / "saved.onnx")
    shutil.rmtree(folder)
    feed = {"x": np.ones((1, 3, 16, 16), np.float32)}
    np.testing.assert_allclose(_run(tmp_path / "saved.onnx", feed)[0], _run_proto(original, feed)[0], atol=1e-6)


def _run_proto(proto, feed):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_calibration_reads_weights_left_in_the_data_file(cnn, tmp_path, monkeypatch):
    model = _lazy_model(cnn, tmp_path, monkeypatch)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)} for i in range(4)]
    stats = compute_ranges(model, feeds, tmp_path / "calibration.json")
    assert (stats.samples, stats.batches) == (4, 4)
    ranges = json.loads((tmp_path / "calibration.json").read_text())
    assert {"x", "conv", "logits"} <= set(ranges["data"])


def test_simplify_skips_weights_left_in_the_data_file(cnn, tmp_path, monkeypatch):
    model = _lazy_model(cnn, tmp_path, monkeypatch)
    simplify = SimplifyPass()
    result = simplify(model)
    assert not result.modified
    assert simplify.note == "skipped: weights over 1 GiB stay in their external data file"
