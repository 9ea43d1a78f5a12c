"""dlopt.export against real torch and real ONNX Runtime: files written, outputs equal."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dlopt.errors import CompileError, ConfigError  # noqa: E402
from dlopt.exporter import export  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
        # A fresh BatchNorm is the identity in eval mode; give it statistics so it matters.
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


class TwoInTwoOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, a, b):
        return self.linear(a) * 2.0, self.linear(b).relu()


class CountsCalls(torch.nn.Module):
    """Adds how often it was called: Python state that an export freezes into a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) + float(self.calls)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny()


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.run(None, feeds)


def _torch(module, *args):
    module.eval()
    with torch.no_grad():
        return module(*args)


def test_export_writes_one_self_contained_file_that_matches_torch(tiny, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    path = export(tiny, x, tmp_path / "tiny.onnx")

    assert path == tmp_path / "tiny.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # no .data, no temp folder
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    onnx.checker.check_model(proto)
    # The plain translation is kept; folding BatchNormalization is dlopt compile's job.
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    session, (got,) = _run(path, {"x": x.numpy()})
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    np.testing.assert_allclose(got, _torch(tiny, x).numpy(), rtol=1e-4, atol=1e-4)


def test_dynamic_batch_axis_runs_other_batch_sizes(tiny, tmp_path):
    path = export(tiny, torch.randn(2, 1, 8, 8), tmp_path / "tiny.onnx", {"x": {0: "batch"}})

    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    five = torch.randn(5, 1, 8, 8)
    _, (got,) = _run(path, {"x": five.numpy()})
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, _torch(tiny, five).numpy(), rtol=1e-4, atol=1e-4)


def test_tuple_inputs_and_outputs_get_names_and_match(tmp_path):
    torch.manual_seed(1)
    module = TwoInTwoOut()
    a, b = torch.randn(3, 6), torch.randn(3, 6)
    path = export(module, (a, b), tmp_path / "two.onnx", output_names=["scaled", "rectified"])

    session, got = _run(path, {"a": a.numpy(), "b": b.numpy()})
    assert [i.name for i in session.get_inputs()] == ["a", "b"]
    assert [o.name for o in session.get_outputs()] == ["scaled", "rectified"]
    for mine, want in zip(got, _torch(module, a, b)):
        np.testing.assert_allclose(mine, want.numpy(), rtol=1e-4, atol=1e-4)


def test_module_keeps_its_training_mode(tiny, tmp_path):
    tiny.train()
    export(tiny, torch.randn(2, 1, 8, 8), tmp_path / "tiny.onnx")
    assert tiny.training


def test_mismatch_raises_and_writes_nothing(tmp_path):
    # The reference call sees calls == 1; the traced graph holds the count at trace time.
    module = CountsCalls()
    with pytest.raises(CompileError, match=r"max abs error \d"):
        export(module, torch.randn(3, 4), tmp_path / "counts.onnx")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_kept_when_export_fails(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(CompileError):
        export(CountsCalls(), torch.randn(3, 4), target)
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]


def test_dynamic_axes_naming_no_input_or_output_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="images"):
        export(tiny, torch.randn(2, 1, 8, 8), tmp_path / "tiny.onnx", {"images": {0: "batch"}})
    assert list(tmp_path.iterdir()) == []


def test_public_name_stays_the_function():
    import dlopt
    import dlopt.exporter  # noqa: F401 - importing the module must not shadow the function

    assert dlopt.export is export
    assert callable(dlopt.export)
