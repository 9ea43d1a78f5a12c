"""The ONNX Runtime backend, and the form every backend fills in (dlopt.targets.base.Backend)."""

import json

import numpy as np
import onnx_ir as ir
import onnxruntime
import pytest

import models
from dlopt.profiles import resolve_target
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
    assert [type(p).__name__ for p in ort.lowering_passes("fp32")] == ["FuseActivationForOrtPass"]
    assert ort.lowering_passes("int8") == []
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
