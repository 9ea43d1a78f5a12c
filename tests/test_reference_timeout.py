"""A model whose reference run never ends (a Loop with 2**62 trips) fails in one line naming the limit."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from cli import dlopt


def endless_loop(trips: int = 2**62, *, constant: bool = False) -> onnx.ModelProto:
    """y = x + trips, one Add per iteration of a Loop whose trip count is an initializer; ``constant``:
    the Loop counts from a constant and x is added after it (a Loop constant folding could try to run)."""
    one = helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones(4, np.float32)))
    body = helper.make_graph(
        [one, helper.make_node("Add", ["v_in", "one"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4])])
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "trips"), numpy_helper.from_array(np.array(True), "cond")]
    if constant:
        nodes = [helper.make_node("Loop", ["trips", "cond", "v0"], ["counted"], body=body, name="loop"),
                 helper.make_node("Add", ["counted", "x"], ["y"], name="add")]
        inits.append(numpy_helper.from_array(np.zeros(4, np.float32), "v0"))
    else:
        nodes = [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body, name="loop")]
    return models._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)


@pytest.fixture(scope="module")
def here(tmp_path_factory):
    """--target/--targets-file of an ONNX Runtime-only target, its file outside every test's folder: the
    reference run is ONNX Runtime's whichever backends the target has."""
    path = tmp_path_factory.mktemp("targets") / "t.toml"
    path.write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    return ("--target", "here", "--targets-file", path)


@pytest.mark.parametrize("constant", [False, True], ids=["from-input", "constant"])
def test_endless_loop_stops_at_the_reference_timeout(tmp_path, constant, here):
    models.save(endless_loop(constant=constant), tmp_path / "loop.onnx")
    start = time.monotonic()
    result = dlopt("compile", tmp_path / "loop.onnx", "-o", tmp_path / "out", "--precision", "fp32", *here,
                   "--reference-timeout", "1", cwd=tmp_path, timeout=240)
    took = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlopt: error: one run of the original model on ONNX Runtime "
                                                   "(feed 1 of 20) passed the 1 s limit"), result.stderr
    assert "--reference-timeout SECONDS" in lines[0]
    assert took < 120, took  # the limit, the imports and the passes; never the 2**62 trips
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]  # no output, staging or lock


def test_a_loop_that_ends_compiles_within_the_limit(tmp_path, here):
    models.save(endless_loop(trips=1000), tmp_path / "loop.onnx")
    result = dlopt("compile", tmp_path / "loop.onnx", "-o", tmp_path / "out", "--precision", "fp32", "--runs", "5",
                   "--warmup", "1", *here, "--reference-timeout", "30", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_reference_timeout_must_be_positive_and_finite(tmp_path, value):
    models.save(endless_loop(), tmp_path / "loop.onnx")
    result = dlopt("compile", tmp_path / "loop.onnx", "-o", tmp_path / "out", "--reference-timeout", value,
                   cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--reference-timeout" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]
