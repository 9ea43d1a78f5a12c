"""dlopt.export against real torch and real ONNX Runtime: files written, outputs equal."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dlopt.core.errors import CompileError, ConfigError, ModelError  # noqa: E402
from dlopt.compression.exporter import export  # noqa: E402


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


class BakesBatch(torch.nn.Module):
    """Runs at any batch in torch, but ``int(x.shape[0])`` is a constant to the exporter: 1 at a batch-1 example."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(x).reshape(int(x.shape[0]), -1)


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
    import dlopt.compression.exporter  # noqa: F401 - importing the module must not shadow the function

    assert dlopt.export is export
    assert callable(dlopt.export)


def test_export_that_only_runs_at_the_example_batch_is_refused(tmp_path):
    torch.manual_seed(2)
    module = BakesBatch()
    assert tuple(_torch(module, torch.randn(2, 8)).shape) == (2, 4)  # torch itself takes any batch
    with pytest.raises(ModelError) as caught:
        export(module, torch.randn(1, 8), tmp_path / "baked.onnx", {"x": {0: "batch"}})
    message = str(caught.value)
    assert "\n" not in message
    # the ORT output is [1, 8] at batch 2 (the Reshape kept the example's 1), torch's [2, 4]
    assert "symbolic batch for x (batch)" in message and "only at the example's batch 1" in message
    assert "at batch 2 output 0 has shape [1, 8] where torch's has [2, 4]" in message
    assert "example batch of 2 or more" in message and "x.view(1, ...)" in message
    assert list(tmp_path.iterdir()) == []


def test_module_that_fails_at_another_batch_in_torch_is_refused(tmp_path):
    class FlattensAll(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)

        def forward(self, x):  # [b, 2, 4] -> [1, 8 * b]: the Linear takes only b == 1
            return self.linear(x.reshape(1, -1))

    with pytest.raises(ModelError, match=r"module itself fails at batch 2 \("):
        export(FlattensAll(), torch.randn(1, 2, 4), tmp_path / "flat.onnx", {"x": {0: "batch"}})
    assert list(tmp_path.iterdir()) == []


def test_symbolic_batch_is_checked_at_one_more_sample(tiny, tmp_path, caplog):
    x = torch.randn(3, 1, 8, 8)
    with caplog.at_level("DEBUG", logger="dlopt.compression.exporter"):
        path = export(tiny, x, tmp_path / "tiny.onnx", {"x": {0: "batch"}})
    assert path.exists()
    checked = [r.getMessage() for r in caplog.records if "at batch" in r.getMessage()]
    assert len(checked) == 1 and checked[0].startswith("exported outputs match torch at batch 4 too")
    # a static export declares no batch to check
    caplog.clear()
    with caplog.at_level("DEBUG", logger="dlopt.compression.exporter"):
        export(BakesBatch(), torch.randn(1, 8), tmp_path / "static.onnx")
    assert not [r for r in caplog.records if "at batch" in r.getMessage()]
