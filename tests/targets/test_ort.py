"""The ONNX Runtime backend, and the form every backend fills in (dlopt.targets.base.Backend)."""

import json

import numpy as np
import onnx_ir as ir
import onnxruntime
import pytest

import models
from dlopt.core.profiles import resolve_target
from dlopt.targets import BACKEND_MODULES, get_backend
from dlopt.targets.base import Artifact, Backend
from helpers import max_rel_error, random_feed, run_ort


def test_every_backend_fills_in_the_form():
    for name in BACKEND_MODULES:
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert backend.entry and backend.settings_file.endswith(".json")
        if backend.available() is True:
            assert isinstance(backend.runtime_version(), str) and backend.runtime_version()
    assert get_backend("ort").runtime_version() == onnxruntime.__version__
    assert get_backend("openvino").own_precisions == ("fp16",)


def test_a_backend_missing_an_attribute_or_method_is_refused():
    with pytest.raises(TypeError, match="lacks entry, settings_file"):
        class NoFiles(Backend):  # noqa: F841 - defining it is the test
            name = "x"

            def available(self): return True
            def runtime_version(self): return "1"
            def precisions(self, profile): return ()
            def supports(self, model): return []
            def compile(self, model, profile, workdir, *, precision, threads): ...
            def load(self, artifact): ...

    class NoLoad(Backend):
        name, entry, settings_file = "y", "m.onnx", "s.json"

        def available(self): return True
        def runtime_version(self): return "1"
        def precisions(self, profile): return ()
        def supports(self, model): return []
        def compile(self, model, profile, workdir, *, precision, threads): ...

    with pytest.raises(TypeError, match="load"):
        NoLoad()


def test_ort_owns_its_fusion_and_compiles_a_verified_artefact(tmp_path):
    ort = get_backend("ort")
    assert [type(p).__name__ for p in ort.lowering_passes("fp32")] == ["FuseActivationForOrtPass",
                                                                         "UnshareIntegerWeightsPass"]
    assert [type(p).__name__ for p in ort.lowering_passes("int8")] == ["UnshareIntegerWeightsPass"]
    proto = models.conv_bn_relu(channels=4, size=8)
    artifact = ort.compile(ir.serde.deserialize_model(proto), resolve_target("cpu"), tmp_path, precision="fp32",
                           threads=1)
    assert isinstance(artifact, Artifact) and artifact.files == ["model.onnx", "session_options.json"]
    settings = json.loads((tmp_path / "session_options.json").read_text())
    assert settings["intra_op_num_threads"] == 1 and settings["onnxruntime_version"] == onnxruntime.__version__
    feed = random_feed(proto)
    got = ort.load(artifact).run(feed)[0]
    assert max_rel_error(run_ort(proto, feed)[0], got) <= 1e-6
    assert isinstance(got, np.ndarray)


def _saturating_matmul():
    """MatMulInteger whose u8 x s8 pairs (255 x 127, twice) overflow the 16-bit sums of x86 kernels without VNNI."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((64, 8), 127, np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, ["N", 8])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w


def test_dlopt_sessions_and_shipped_settings_run_int8_exactly(tmp_path):
    """On an AVX2 EPYC, ORT's default kernels gave 1,048,544 for 2,072,640 here; with the settings dlopt ships
    (session.x64quantprecision) every session it opens, and the device script's, is exact.  (On CPUs with
    VNNI both are exact: this guards the machines without it.)"""
    from dlopt.device.device_check import open_plain
    from dlopt.targets.ort import OrtSession, session_settings

    model, w = _saturating_matmul()
    a = np.full((4, 64), 255, np.uint8)
    expected = a.astype(np.int64) @ w.astype(np.int64)
    settings = session_settings(1)
    assert settings["config_entries"] == {"session.x64quantprecision": "1"}
    assert np.array_equal(OrtSession(model.SerializeToString(), settings).run({"a": a})[0], expected)
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "session_options.json").write_text(json.dumps(settings))
    assert np.array_equal(open_plain(tmp_path, "ort", threads=1)({"a": a})[0], expected)
    assert np.array_equal(run_ort(model, {"a": a})[0], expected)  # the tests' reference runs exact too


def test_int8_pairs_saturate_only_on_x86_cpus_without_vnni():
    import dataclasses

    x86 = resolve_target("x86-avx512")
    assert not resolve_target("rpi5").int8_pairs_saturate()  # ARM: 32-bit accumulation
    assert dataclasses.replace(x86, name="no-vnni", cpu_flags=("avx2", "dlopt_no_such_flag")).int8_pairs_saturate()
    assert not dataclasses.replace(x86, name="vnni", cpu_flags=("avx512f", "avx512_vnni")).int8_pairs_saturate()
