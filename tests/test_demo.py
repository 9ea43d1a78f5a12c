"""``dlopt demo`` end to end: train, export, compile for cpu, and report real accuracy."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")

from click.testing import CliRunner  # noqa: E402

from dlopt.cli.app import main  # noqa: E402

ACCURACY_LINE = re.compile(
    r"top-1 accuracy on (\d+) held-out digits: original ([\d.]+)%, optimised ([\d.]+)%")


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.fixture
def one_torch_thread():
    """One torch thread for the compile's PyTorch work (ExecuTorch's torch.export, PT2E calibration), as
    DLOPT_THREADS=1 (tests/conftest.py) gives the runtimes one: on a loaded two-core machine a second
    thread spins in OpenMP's barrier. The demo trains on one thread whatever this says."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_trains_compiles_and_keeps_accuracy(tmp_path, one_torch_thread):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "-o", str(out)])

    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    found = ACCURACY_LINE.search(result.stdout)
    assert found, result.stdout
    samples, original, optimised = int(found[1]), float(found[2]), float(found[3])
    assert samples == 450  # 25% of scikit-learn's 1797 digits, stratified
    assert original >= 90.0 and optimised >= 90.0
    assert abs(original - optimised) < 0.5

    report = json.loads((out / "cpu" / "report.json").read_text())
    chosen = next(c for c in report["candidates"] if c["chosen"])
    assert report["baseline"]["accuracy"] == pytest.approx(original / 100, abs=5e-5)
    assert chosen["measurement"]["accuracy"] == pytest.approx(optimised / 100, abs=5e-5)
    assert (out / "cpu" / "manifest.json").is_file()

    assert "BatchNormalization" in _ops(out / "digits_cnn.onnx")
    assert "BatchNormalization" not in _ops(out / "cpu" / "model.onnx")
    ran = {p["name"]: p for p in report["passes"]}
    assert ran["FoldBatchNormPass"]["modified"]
