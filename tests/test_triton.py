"""Triton model repositories: every config.pbtxt parsed with tritonclient's ModelConfig and checked
against the model it serves."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import models

pytest.importorskip("tritonclient", reason="Triton packaging needs tritonclient (pip install 'dlopt[triton]')")

import dlopt  # noqa: E402
from dlopt.errors import ConfigError  # noqa: E402
from dlopt.package_cli import package  # noqa: E402
from dlopt.triton import model_config_pb2, read_config, write_repository  # noqa: E402

TARGETS = """
[targets.ship]
base = "x86-avx2"
cpu_flags = ["dlopt-not-this-host"]
backends = ["ort", "openvino"]
precisions = ["fp32"]
cores = 4

[targets.gpu]
base = "nvidia-gpu"
backends = ["tensorrt", "ort"]
precisions = ["fp16"]

[targets.here]
base = "cpu"
backends = ["ort"]
precisions = ["fp32"]
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One compile per target: not this host, so every candidate ships (no timing: seconds)."""
    root = tmp_path_factory.mktemp("triton")
    model = models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx")
    (root / "targets.toml").write_text(TARGETS)
    outs = {}
    for target in ("ship", "gpu"):
        outs[target] = root / f"out-{target}"
        dlopt.compile(model, target=target, targets_file=root / "targets.toml", out=outs[target], samples=4)
    return root, outs


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_io(config, onnx_path) -> None:
    """Inputs/outputs of the config are the model's, the batch axis taken out."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    pb = model_config_pb2()
    for ours, theirs in ((config.input, proto.graph.input), (config.output, proto.graph.output)):
        assert [t.name for t in ours] == [v.name for v in theirs]
        for t, v in zip(ours, theirs):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            assert not v.type.tensor_type.shape.dim[0].HasField("dim_value")  # symbolic batch
            assert list(t.dims) == dims[1:]
            assert t.data_type == pb.DataType.Value("TYPE_FP32")


def test_ort_and_openvino_repository(built):
    root, outs = built
    repo = root / "repo"
    result = CliRunner().invoke(package, [str(outs["ship"]), "--triton", str(repo), "--name", "cnn"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(package, [str(outs["ship"] / "bundle" / "openvino-fp32"), "--triton", str(repo),
                                          "--name", "cnn_ov", "--max-batch-size", "16"])
    assert result.exit_code == 0, result.output

    ort_cfg = read_config(repo / "cnn" / "config.pbtxt")
    assert (ort_cfg.name, ort_cfg.platform, ort_cfg.backend) == ("cnn", "onnxruntime_onnx", "onnxruntime")
    assert ort_cfg.max_batch_size == 8
    assert list(ort_cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert ort_cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.kind, g.count) for g in ort_cfg.instance_group] == [(2, 1)]  # KIND_CPU
    settings = json.loads((outs["ship"] / "session_options.json").read_text())
    assert ort_cfg.parameters["intra_op_thread_count"].string_value == str(settings["intra_op_num_threads"]) == "4"
    assert ort_cfg.parameters["inter_op_thread_count"].string_value == "1"
    assert ort_cfg.parameters["execution_mode"].string_value == "0"
    assert not ort_cfg.optimization.execution_accelerators.cpu_execution_accelerator
    assert sorted(p.name for p in (repo / "cnn" / "1").iterdir()) == ["model.onnx"]
    assert _sha(repo / "cnn" / "1" / "model.onnx") == _sha(outs["ship"] / "model.onnx")
    _check_io(ort_cfg, repo / "cnn" / "1" / "model.onnx")
    # the served file takes a batch of max_batch_size with the config's per-sample dims
    session = ort.InferenceSession(str(repo / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((8, *ort_cfg.input[0].dims)).astype(np.float32)
    assert session.run(None, {"x": x})[0].shape == (8, *ort_cfg.output[0].dims)

    ov_cfg = read_config(repo / "cnn_ov" / "config.pbtxt")
    assert (ov_cfg.backend, ov_cfg.platform, ov_cfg.max_batch_size) == ("openvino", "", 16)
    assert list(ov_cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert ov_cfg.default_model_filename == "model.xml"
    ov_settings = json.loads((outs["ship"] / "bundle" / "openvino-fp32" / "runtime_config.json").read_text())
    assert {k: v.string_value for k, v in ov_cfg.parameters.items()} == {
        "INFERENCE_NUM_THREADS": "4", "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": ov_settings["properties"]["PERFORMANCE_HINT"]}
    assert sorted(p.name for p in (repo / "cnn_ov" / "1").iterdir()) == ["model.bin", "model.xml"]
    _check_io(ov_cfg, outs["ship"] / "model.onnx")


def test_tensorrt_engine_and_accelerator(built, tmp_path):
    root, outs = built
    repo = tmp_path / "repo"
    # before the engine is built on the device: ORT with its TensorRT accelerator at the bundle's precision
    model = write_repository(outs["gpu"], repo, name="cnn_trt")
    cfg = read_config(repo / "cnn_trt" / "config.pbtxt")
    assert (cfg.platform, cfg.backend, model.device_kind) == ("onnxruntime_onnx", "onnxruntime", "gpu")
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(a.name, dict(a.parameters)) for a in accel] == [("tensorrt", {"precision_mode": "FP16"})]
    assert [g.kind for g in cfg.instance_group] == [1]  # KIND_GPU
    # an ORT candidate shipped with the TensorRT provider gets the accelerator too
    ort_cfg = write_repository(outs["gpu"] / "bundle" / "ort-fp16", repo, name="cnn_ort").config
    assert [a.name for a in ort_cfg.optimization.execution_accelerators.gpu_execution_accelerator] == ["tensorrt"]
    # once build_engine.sh has run on the device: the engine as a tensorrt_plan
    (outs["gpu"] / "model.engine").write_bytes(b"engine bytes")
    try:
        model = write_repository(outs["gpu"], repo, name="cnn_trt", version=2)
    finally:
        (outs["gpu"] / "model.engine").unlink()
    cfg = read_config(repo / "cnn_trt" / "config.pbtxt")
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("tensorrt_plan", "tensorrt", "model.plan")
    assert (repo / "cnn_trt" / "2" / "model.plan").read_bytes() == b"engine bytes"
    assert (repo / "cnn_trt" / "1" / "model.onnx").is_file()  # version 1 is still served
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # staging folders beside it are gone
    _check_io(cfg, outs["gpu"] / "model.onnx")


def test_refuses_what_dlopt_did_not_write(built, tmp_path):
    _, outs = built
    repo = tmp_path / "repo"
    (repo / "theirs").mkdir(parents=True)
    (repo / "theirs" / "config.pbtxt").write_text('name: "theirs"\n')
    with pytest.raises(ConfigError, match="did not write"):
        write_repository(outs["ship"], repo, name="theirs")
    assert (repo / "theirs" / "config.pbtxt").read_text() == 'name: "theirs"\n'
    assert sorted(p.name for p in repo.iterdir()) == ["theirs"]  # no staging folder left behind
    result = CliRunner().invoke(package, [str(outs["ship"]), "--triton", str(repo), "--name", "-bad"])
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    assert "Triton model name" in str(result.exception)


def test_fixed_batch(built, tmp_path):
    root, _ = built
    model = models.save(models.conv_bn_relu(batch=1), tmp_path / "fixed.onnx")
    out = tmp_path / "fixed-out"
    dlopt.compile(model, target="here", targets_file=root / "targets.toml", out=out, samples=2, runs=2, warmup=0)
    cfg = write_repository(out, tmp_path / "repo").config
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3, 16, 16]
    assert list(cfg.output[0].dims) == [1, 10] and not cfg.HasField("dynamic_batching")
    with pytest.raises(ConfigError, match="no symbolic batch"):
        write_repository(out, tmp_path / "repo", name="fixed", max_batch_size=4)
