"""Artefacts built for a device carry the device's settings, never this host's."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest
from onnx import helper

import models
from cli import dlopt
from helpers import random_feed, run_ort

from dlopt.core.errors import ConfigError
from dlopt.core.profiles import resolve_target
from dlopt.targets import ort, tensorrt


def _ir(proto):
    return ir.serde.deserialize_model(proto)


@pytest.fixture(scope="module")
def rpi5(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpi5")
    model = models.save(models.conv_bn_relu(batch="N"), tmp / "m.onnx")
    result = dlopt("compile", model, "--target", "rpi5", "--precision", "fp32", "-o", tmp / "out", "--runs", "5",
                   "--samples", "16", cwd=tmp)  # random feeds of one sample each (a classifier would get 1000)
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def test_rpi5_artefacts_run_with_the_boards_four_cores(rpi5):
    settings = json.loads((rpi5 / "session_options.json").read_text())
    assert settings["intra_op_num_threads"] == 4
    assert settings["threads_from"] == "target rpi5: 4 cores"
    assert settings["providers"] == ["CPUExecutionProvider"]
    tvm_build = json.loads((rpi5 / "bundle" / "tvm-fp32" / "tvm_build.json").read_text())
    assert (tvm_build["threads"], tvm_build["threads_from"]) == (4, "target rpi5: 4 cores")
    # the same artefact was loaded and verified on this host, whatever its core count
    report = json.loads((rpi5 / "report.json").read_text())
    chosen = next(c for c in report["candidates"] if c["backend"] == "ort")
    # BatchNorm folded in float64 by dlopt: within float rounding of ORT's own fold, not bit-identical
    assert report["chosen"] == "ort/fp32" and chosen["fidelity"]["max_rel_error"] <= 1e-6


def test_a_target_that_runs_here_keeps_the_requested_threads(tmp_path):
    artifact = ort.BACKEND.compile(_ir(models.conv_bn_relu()), resolve_target("cpu"), tmp_path, precision="fp32", threads=1)
    settings = json.loads((tmp_path / "session_options.json").read_text())
    assert (settings["intra_op_num_threads"], settings["threads_from"]) == (1, "this host")
    assert artifact.settings == settings


def test_a_target_without_cores_keeps_the_requested_threads_and_says_so(tmp_path):
    ort.BACKEND.compile(_ir(models.conv_bn_relu()), resolve_target("arm64"), tmp_path, precision="fp32", threads=3)
    settings = json.loads((tmp_path / "session_options.json").read_text())
    assert settings["intra_op_num_threads"] == 3
    assert settings["threads_from"] == "this host (target arm64 states no cores; set cores in a TOML target)"


def test_preset_cores():
    cores = {name: resolve_target(name).cores for name in
             ("rpi4", "rpi5", "jetson-orin", "jetson-nano", "arm64", "nvidia-gpu", "cpu")}
    assert cores == {"rpi4": 4, "rpi5": 4, "jetson-orin": 12, "jetson-nano": 4, "arm64": None,
                     "nvidia-gpu": None, "cpu": None}


def test_jetson_ort_lists_tensorrt_cuda_cpu_and_loads_here_with_what_exists(tmp_path):
    proto = models.conv_bn_relu()
    artifact = ort.BACKEND.compile(_ir(proto), resolve_target("jetson"), tmp_path, precision="fp32", threads=1)
    settings = json.loads((tmp_path / "session_options.json").read_text())
    assert settings["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (settings["intra_op_num_threads"], settings["threads_from"]) == (12, "target jetson-orin: 12 cores")
    wanted = [p for p in settings["providers"] if p in onnxruntime.get_available_providers()]
    session = ort.BACKEND.load(artifact)
    assert session._session.get_providers() == wanted
    # 12 threads asked, at most this host's cores used; an explicit count replaces them
    usable = len(os.sched_getaffinity(0))
    assert session._session.get_session_options().intra_op_num_threads == min(12, usable)
    assert ort.BACKEND.load(artifact, threads=1)._session.get_session_options().intra_op_num_threads == 1
    feed = random_feed(proto)
    np.testing.assert_allclose(session.run(feed)[0], run_ort(proto, feed)[0], rtol=1e-5, atol=1e-6)


def test_user_target_with_its_own_cores(tmp_path):
    path = tmp_path / "dlopt.toml"
    path.write_text('[targets.board]\nbase = "jetson-orin"\ndescription = "Orin NX"\ncores = 6\n')
    board = resolve_target("board", path)
    ort.BACKEND.compile(_ir(models.conv_bn_relu()), board, tmp_path / "a", precision="fp32", threads=1)
    settings = json.loads((tmp_path / "a" / "session_options.json").read_text())
    assert (settings["intra_op_num_threads"], settings["threads_from"]) == (6, "target board: 6 cores")


@pytest.mark.parametrize("value", ["0", "true", '"4"'])
def test_user_target_cores_must_be_a_positive_integer(tmp_path, value):
    path = tmp_path / "dlopt.toml"
    path.write_text(f'[targets.board]\nbase = "rpi5"\ncores = {value}\n')
    with pytest.raises(ConfigError) as err:
        resolve_target("board", path)
    shown = {"0": "0", "true": "True", '"4"': "'4'"}[value]
    assert str(err.value) == f"{path}: targets.board.cores must be a positive integer, got {shown}"


def _bundle(tmp_path, proto, shapes, precision="fp16"):
    tensorrt.BACKEND.compile(_ir(proto), resolve_target("jetson"), tmp_path, precision=precision, threads=1, shapes=shapes)
    script = (tmp_path / "build_engine.sh").read_text()
    assert subprocess.run(["sh", "-n", str(tmp_path / "build_engine.sh")]).returncode == 0
    return script, json.loads((tmp_path / "tensorrt_build.json").read_text())


def test_dynamic_batch_bundle_builds_an_optimisation_profile(tmp_path):
    script, build = _bundle(tmp_path, models.conv_bn_relu(batch="N"), {"x": (4, 3, 16, 16)})
    assert "--minShapes=x:1x3x16x16 --optShapes=x:4x3x16x16 --maxShapes=x:8x3x16x16 --skipInference" in script
    assert "--shapes=" not in script
    assert build["optimization_profile"] == {"x": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16],
                                                   "max": [8, 3, 16, 16]}}
    assert build["static_shapes"] is None
    assert "Input x is built for shapes 1x3x16x16 to 8x3x16x16, tuned for 4x3x16x16." in (
        tmp_path / "README.txt").read_text()


def test_large_batch_doubles_and_other_symbolic_dims_are_pinned(tmp_path):
    script, build = _bundle(tmp_path, models.attention_block(batch="N", seq="S"), {"x": (16, 64, 32)})
    assert build["optimization_profile"]["x"]["max"] == [32, 64, 32]
    assert "--minShapes=x:1x64x32 --optShapes=x:16x64x32 --maxShapes=x:32x64x32" in script


def test_static_model_keeps_shapes(tmp_path):
    script, build = _bundle(tmp_path, models.conv_bn_relu(), {"x": (1, 3, 16, 16)}, precision="int8")
    assert "--int8 --fp16 --shapes=x:1x3x16x16 --skipInference" in script
    assert "Shapes=" not in script
    assert build["optimization_profile"] is None and build["static_shapes"] == {"x": [1, 3, 16, 16]}


def test_profile_names_reach_trtexec_as_single_arguments(tmp_path):
    name = "x ; touch victim ; echo "
    w = models._init("w", np.ones((4, 3), np.float32))
    x = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])
    proto = models._model([helper.make_node("MatMul", [name, "w"], ["y"])], [x], [y], [w])
    _bundle(tmp_path, proto, {name: (2, 4)})
    fake = tmp_path / "trtexec"  # stands in for the trtexec binary, which only exists on the device
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGV_FILE"\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "TRTEXEC": str(fake), "ARGV_FILE": str(tmp_path / "argv.txt")}
    run = subprocess.run(["sh", str(tmp_path / "build_engine.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert list(tmp_path.rglob("victim")) == []
    assert (tmp_path / "argv.txt").read_text().splitlines() == [
        "--onnx=model.onnx", "--saveEngine=model.engine", "--fp16", f"--minShapes={name}:1x4",
        f"--optShapes={name}:2x4", f"--maxShapes={name}:8x4", "--skipInference"]
