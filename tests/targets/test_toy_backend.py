"""A backend is one place: a new one is one module, one registry line and a target entry.

``toyort`` (ONNX Runtime on the float model under another name) is written into a temporary
folder as the only module it needs; the registry gains one line and a user TOML target lists
it.  A compile through ``dlopt.compile`` builds, verifies, times and ships it, and ``dlopt.load``
runs it: no other dlopt file knows its name."""

import json
import sys

import numpy as np
import onnxruntime as ort

import dlopt
import models
from dlopt import targets

TOY_MODULE = '''
import json

import onnxruntime

from dlopt.core.model_io import save_ir
from dlopt.targets.base import Artifact, Backend


class ToySession:
    def __init__(self, path):
        self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feeds):
        return self._session.run(None, feeds)


class ToyBackend(Backend):
    name, entry, settings_file = "toyort", "toy.onnx", "toy.json"

    def available(self):
        return True

    def runtime_version(self):
        return "toy-" + onnxruntime.__version__

    def precisions(self, profile):
        return ("fp32",)

    def supports(self, model):
        return []

    def compile(self, model, profile, workdir, *, precision, threads, shapes=None):
        workdir.mkdir(parents=True, exist_ok=True)
        files = save_ir(model, workdir / self.entry)
        (workdir / self.settings_file).write_text(json.dumps({"threads": threads}) + "\\n")
        return Artifact(self.name, precision, workdir, [f.name for f in files] + [self.settings_file], self.entry,
                        settings={"threads": threads})

    def load(self, artifact):
        return ToySession(artifact.entry_path)


BACKEND = ToyBackend()
'''

TOY_TARGET = '[targets.toybox]\nbase = "cpu"\nbackends = ["toyort"]\nprecisions = ["fp32"]\n'


def test_a_backend_from_one_module_one_registry_line_and_a_target_compiles_loads_and_runs(tmp_path, monkeypatch):
    (tmp_path / "toy_backend_module.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(targets.BACKEND_MODULES, "toyort", "toy_backend_module")  # the one registry line
    (tmp_path / "t.toml").write_text(TOY_TARGET)
    model_path = models.save(models.conv_bn_relu(channels=4, size=8), tmp_path / "m.onnx")

    report = dlopt.compile(model_path, target="toybox", out=tmp_path / "out", precision="fp32",
                           targets_file=tmp_path / "t.toml", progress=False)

    assert report.chosen == "toyort/fp32"
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["chosen"] == "toyort/fp32"
    assert [(c["backend"], c["precision"], c["status"]) for c in data["candidates"]] == [("toyort", "fp32", "ok")]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["backend"] == "toyort" and "toy.onnx" in manifest["files"]

    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    reference = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with dlopt.load(tmp_path / "out") as loaded:
        got = loaded.run({"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    assert "toy_backend_module" in sys.modules
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "toyort (toyort/fp32): `pip install numpy` and the runtime this backend loads" in readme
