"""The TensorRT bundle for Jetson: verified ONNX, an engine-build script, nothing invented."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import models
from cli import dlopt

from dlopt.core.errors import ModelError
from dlopt.core.profiles import resolve_target
from dlopt.targets import tensorrt


@pytest.fixture(scope="module")
def jetson(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jetson")
    model = models.save(models.conv_bn_relu(), tmp / "m.onnx")
    result = dlopt("compile", model, "--target", "jetson", "-o", tmp / "out", "--runs", "5", cwd=tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "out", json.loads((tmp / "out" / "report.json").read_text())


def test_int8_qdq_onnx_and_engine_script_at_top_level(jetson):
    out, report = jetson
    assert report["chosen"] == "tensorrt/int8"
    model = onnx.load(out / "model.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # TensorRT needs symmetric int8: every zero point is 0
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) == 3:
            assert not zero_points[node.input[2]].any()
            assert zero_points[node.input[2]].dtype.name in ("int8", "int32")  # int32: biases
    script = (out / "build_engine.sh").read_text()
    assert "--onnx=model.onnx" in script and "--int8 --fp16" in script and "--shapes=x:1x3x16x16" in script
    assert subprocess.run(["sh", "-n", str(out / "build_engine.sh")]).returncode == 0  # valid shell
    assert (out / "calibration.json").is_file()


def test_fp16_bundle_and_report_says_what_was_not_measured(jetson):
    out, report = jetson
    fp16 = onnx.load(out / "bundle" / "tensorrt-fp16" / "model.onnx")
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert "--fp16" in (out / "bundle" / "tensorrt-fp16" / "build_engine.sh").read_text()
    for cand in report["candidates"]:
        if cand["status"] == "ok":
            assert cand["measurement"]["latency"] is None  # no Jetson attached: never invented
            if cand["backend"] != "tvm":  # TVM's aarch64+CUDA library cannot run here at all
                assert cand["fidelity"]["max_rel_error"] < 0.05  # but the ONNX was checked here
            else:
                assert cand["fidelity"] is None and "not verified here; not yet measured on the device" in cand["reason"]
    trt = [c for c in report["candidates"] if c["backend"] == "tensorrt"]
    assert all("verified on ONNX Runtime here" in c["reason"] for c in trt)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bundle"]["tensorrt/fp16"] == "bundle/tensorrt-fp16"


def test_supports_names_ops_the_parser_lacks():
    model = models.conv_bn_relu()
    assert tensorrt.BACKEND.supports(ir.serde.deserialize_model(model)) == []
    model.graph.node.append(helper.make_node("NonZero", ["logits"], ["nz"]))
    model.graph.node.append(helper.make_node("FusedConv", ["x", "w"], ["fc"], domain="com.microsoft"))
    assert tensorrt.BACKEND.supports(ir.serde.deserialize_model(model)) == ["NonZero", "com.microsoft.FusedConv"]


def test_precisions_only_for_gpu_targets():
    assert tensorrt.BACKEND.precisions(resolve_target("jetson-orin")) == ("fp16", "int8", "mixed")
    assert tensorrt.BACKEND.precisions(resolve_target("rpi5")) == ()


def _one_input_model(input_name: str) -> onnx.ModelProto:
    w = models._init("w", np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    x = helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    return models._model([helper.make_node("MatMul", [input_name, "w"], ["y"])], [x], [y], [w])


def test_input_name_reaches_trtexec_as_one_argument_never_as_shell(tmp_path):
    name = "x ; touch victim ; echo "
    model = models.save(_one_input_model(name), tmp_path / "m.onnx")
    result = dlopt("compile", model, "--target", "nvidia-gpu", "--precision", "fp16", "-o", tmp_path / "out",
                   "--runs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["chosen"] == "tensorrt/fp16"
    # stands in for the trtexec binary, which only exists on the device
    fake = tmp_path / "trtexec"
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGV_FILE"\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TRTEXEC": str(fake), "ARGV_FILE": str(tmp_path / "argv.txt")}
    run = subprocess.run(["sh", str(tmp_path / "out" / "build_engine.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert list(tmp_path.rglob("victim")) == []
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv == ["--onnx=model.onnx", "--saveEngine=model.engine", "--fp16", f"--shapes={name}:1x4",
                    "--skipInference"]


@pytest.mark.parametrize("name, bad", [("input:0", "':'"), ("a,b", "','"), ("it's", '"\'"')])
def test_input_name_trtexec_cannot_parse_is_refused(tmp_path, name, bad):
    model = ir.serde.deserialize_model(_one_input_model(name))
    workdir = tmp_path / "w"
    with pytest.raises(ModelError) as err:
        tensorrt.BACKEND.compile(model, resolve_target("nvidia-gpu"), workdir, precision="fp16", threads=1)
    assert str(err.value) == (f"input {name!r} cannot be passed to trtexec --shapes: its name contains {bad}; "
                              "rename the input to build a TensorRT bundle")
    assert not workdir.exists()  # refused before anything was written
