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
from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.cli.package import package  # noqa: E402
from dlopt.deploy.triton import model_config_pb2, read_config, write_repository  # noqa: E402

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
    # once build_engine.sh has run on the device: the engine as a tensorrt_plan.  Not as version 2 beside
    # the ORT version 1 (one config.pbtxt cannot serve both), but in place of version 1
    (outs["gpu"] / "model.engine").write_bytes(b"engine bytes")
    try:
        with pytest.raises(ConfigError, match=r"serves version 1 on onnxruntime_onnx \(model.onnx\).*"
                                              r"would need tensorrt_plan \(model.plan\).*--name cnn_trt_tensorrt"):
            write_repository(outs["gpu"], repo, name="cnn_trt", version=2)
        model = write_repository(outs["gpu"], repo, name="cnn_trt", version=1)
    finally:
        (outs["gpu"] / "model.engine").unlink()
    cfg = read_config(repo / "cnn_trt" / "config.pbtxt")
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == ("tensorrt_plan", "tensorrt", "model.plan")
    assert sorted(p.name for p in (repo / "cnn_trt").iterdir()) == ["1", "config.pbtxt", "dlopt_package.json"]
    assert sorted(p.name for p in (repo / "cnn_trt" / "1").iterdir()) == ["model.plan"]  # model.onnx replaced
    assert (repo / "cnn_trt" / "1" / "model.plan").read_bytes() == b"engine bytes"
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
    # the same backend but another signature (fixed batch of 1 vs N) cannot be a version of the batched model
    _, outs = built
    write_repository(outs["ship"], tmp_path / "repo", name="cnn")
    before = _files(tmp_path / "repo")
    with pytest.raises(ConfigError) as refused:
        write_repository(out, tmp_path / "repo", name="cnn", version=2)
    assert str(refused.value) == (
        "Triton model cnn serves version 1 with x[N,3,16,16] FP32 -> logits[N,10] FP32, and every version of a model "
        "shares its one config.pbtxt: version 2 takes x[1,3,16,16] FP32 -> logits[1,10] FP32; package it under its "
        "own name (another --name); nothing was written")
    assert _files(tmp_path / "repo") == before


def _files(folder) -> dict:
    """Every file under ``folder`` (relative path -> sha256): what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_version_on_another_backend_is_refused(built, tmp_path):
    """Version 1 on OpenVINO, then an ORT artefact as --version 2 of the same model: Triton loads every
    version with the model's one config.pbtxt, so the ORT config would leave 1/model.xml unloadable."""
    _, outs = built
    repo = tmp_path / "repo"
    result = CliRunner().invoke(package, [str(outs["ship"] / "bundle" / "openvino-fp32"), "--triton", str(repo),
                                          "--name", "cnn"])
    assert result.exit_code == 0, result.output
    before = _files(repo)
    result = CliRunner().invoke(package, [str(outs["ship"]), "--triton", str(repo), "--name", "cnn", "--version", "2"])
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    message = str(result.exception)
    assert "\n" not in message
    assert message == (f"Triton model cnn serves version 1 on openvino (model.xml), and every version of a model "
                       f"shares its one config.pbtxt: version 2, an ort/fp32 artefact, would need onnxruntime_onnx "
                       f"(model.onnx); package it under its own name (--name cnn_ort); nothing was written")
    assert _files(repo) == before  # version 1 and its config untouched, no version 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging folder left
    assert read_config(repo / "cnn" / "config.pbtxt").backend == "openvino"
    # under its own name, as the message says, it is served beside the OpenVINO model
    result = CliRunner().invoke(package, [str(outs["ship"]), "--triton", str(repo), "--name", "cnn_ort"])
    assert result.exit_code == 0, result.output
    assert read_config(repo / "cnn_ort" / "config.pbtxt").platform == "onnxruntime_onnx"
    assert _files(repo / "cnn") == {k.removeprefix("cnn/"): v for k, v in before.items() if k.startswith("cnn/")}


def test_versions_on_the_same_backend_side_by_side(built, tmp_path):
    """Two ORT versions of one model: both versions' files stay, and the one config serves both."""
    _, outs = built
    repo = tmp_path / "repo"
    write_repository(outs["ship"], repo, name="cnn", version=1)
    v2 = write_repository(outs["ship"], repo, name="cnn", version=2)
    assert v2.files == ("model.onnx",)
    assert {p: sorted(f.name for f in (repo / "cnn" / p).iterdir()) for p in ("1", "2")} == {
        "1": ["model.onnx"], "2": ["model.onnx"]}
    assert _sha(repo / "cnn" / "1" / "model.onnx") == _sha(outs["ship"] / "model.onnx")
    assert _sha(repo / "cnn" / "2" / "model.onnx") == _sha(outs["ship"] / "model.onnx")
    cfg = read_config(repo / "cnn" / "config.pbtxt")
    assert (cfg.platform, cfg.default_model_filename, cfg.max_batch_size) == ("onnxruntime_onnx", "model.onnx", 8)
    for version in ("1", "2"):
        _check_io(cfg, repo / "cnn" / version / "model.onnx")
    assert json.loads((repo / "cnn" / "dlopt_package.json").read_text())["versions"] == [1, 2]
    # OpenVINO versions too: model.xml and model.bin in each, one openvino config
    for version in (1, 2):
        write_repository(outs["ship"] / "bundle" / "openvino-fp32", repo, name="cnn_ov", version=version)
    assert {p: sorted(f.name for f in (repo / "cnn_ov" / p).iterdir()) for p in ("1", "2")} == {
        "1": ["model.bin", "model.xml"], "2": ["model.bin", "model.xml"]}
    assert read_config(repo / "cnn_ov" / "config.pbtxt").backend == "openvino"
