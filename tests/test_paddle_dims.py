"""Paddle's exports: unknown sizes written as ``-1`` (a negative dim_value, which ONNX does not
allow) and as the one symbolic name ``?`` on every unknown axis.  dlopt names them (axis 0 is
the batch) instead of refusing the model or reading every ``?`` as one shared size."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import dlopt
from dlopt.core.model_io import negative_dim_names, with_named_dims
from tests import models
from tests.cli import dlopt as run_cli

ORT_ONLY = '[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n'


def paddle_style(path=None):
    """A conv classifier declared as Paddle writes it: x [-1, 3, ?, ?] -> probs [-1, 4]."""
    model = models.conv_bn_relu()
    x = model.graph.input[0].type.tensor_type.shape.dim
    x[0].dim_value = -1
    x[2].dim_param = "?"
    x[3].dim_param = "?"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    if path is not None:
        onnx.save(model, path)
    return model


def test_every_unknown_axis_gets_its_own_name_and_axis_0_is_the_shared_batch():
    model = paddle_style()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "batch"  # a name the graph already uses
    assert negative_dim_names(model) == {("x", 0): "batch_1", ("x", 2): "x_d2", ("x", 3): "x_d3",
                                         ("logits", 0): "batch_1"}
    named = with_named_dims(model)
    assert [d.dim_param for d in named.graph.input[0].type.tensor_type.shape.dim] == ["batch_1", "batch", "x_d2", "x_d3"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # the caller's proto is kept
    assert with_named_dims(models.conv_bn_relu()) is not None and negative_dim_names(models.conv_bn_relu()) == {}


def test_cli_names_the_dims_to_fix_and_compiles_with_them(tmp_path):
    path = tmp_path / "paddle.onnx"
    paddle_style(path)
    result = run_cli("compile", path, "--target", "cpu", "--precision", "fp32", "-o", tmp_path / "none")
    assert result.returncode == 2, result.stderr
    assert "--shape x_d2=N (x dim 2); --shape x_d3=N (x dim 3)" in result.stderr
    assert "negative" not in result.stderr and not (tmp_path / "none").exists()

    out = tmp_path / "out"
    (tmp_path / "t.toml").write_text(ORT_ONLY)
    result = run_cli("compile", path, "--target", "here", "--targets-file", tmp_path / "t.toml", "--precision",
                     "fp32", "--shape", "x_d2=12", "--shape", "x_d3=20", "-o", out, "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chosen"] == "ort/fp32"
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 20)).astype(np.float32)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with dlopt.load(out) as model:
        got = model.run({"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_api_compiles_an_in_memory_paddle_proto_and_leaves_it_as_given(tmp_path):
    model = paddle_style()
    (tmp_path / "t.toml").write_text(ORT_ONLY)
    report = dlopt.compile(model, target="here", out=tmp_path / "out", precision="fp32", shapes={"x": (1, 3, 8, 8)},
                           targets_file=tmp_path / "t.toml", progress=False)
    assert report.chosen == "ort/fp32"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
