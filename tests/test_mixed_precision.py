"""When plain INT8 misses the budget, the sensitive nodes stay in float and the budget holds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import models

import dlopt


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    np.savez(tmp / "eval.npz", x=rng.standard_normal((256, 16)).astype(np.float32))
    calib = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(16)]
    report = dlopt.compile(models.outlier_mlp(), out=tmp / "out", precision="int8", inputs=tmp / "eval.npz",
                           calib=calib, runs=5, max_accuracy_drop=2.0)
    return tmp, report


def test_plain_int8_misses_the_budget(fallback):
    _, report = fallback
    int8 = next(c for c in report.candidates if c.key == "ort/int8")
    assert int8.status == "rejected"
    assert int8.score["metric"] == "top-1 agreement" and int8.score["drop_pp"] > 10
    assert "over the budget of 2.0" in int8.reason


def test_mixed_meets_it_with_the_outlier_layers_in_float(fallback):
    tmp, report = fallback
    mixed = report.chosen_candidate()
    assert mixed.key == "ort/mixed" and mixed.status == "ok"
    assert mixed.score["drop_pp"] <= 2.0
    floats = [n["op_type"] for n in mixed.float_nodes]
    assert floats == ["Gemm", "Gemm"]  # the layers producing and consuming the outlier channel
    assert all(n["drop_pp"] > 10 for n in mixed.float_nodes)  # what each costs when quantised alone
    assert report.search["met_budget"] and report.search["complete"] and report.search["nodes_considered"] == 3
    # dense0, the well-behaved first layer, is still INT8 in the written model
    model = onnx.load(tmp / "out" / "model.onnx")
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    first = next(n for n in model.graph.node if n.name == "dense0")
    assert any(producers.get(i) == "DequantizeLinear" for i in first.input)
    assert (tmp / "out" / "calibration.json").is_file()


def test_report_names_the_float_nodes(fallback):
    tmp, report = fallback
    data = json.loads((tmp / "out" / "report.json").read_text())
    mixed = next(c for c in data["candidates"] if c["precision"] == "mixed")
    assert [n["name"] for n in mixed["float_nodes"]] == [n["name"] for n in report.chosen_candidate().float_nodes]
    assert "Layers kept in float" in (tmp / "out" / "report.md").read_text()
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    assert manifest["float_nodes"] == [n["name"] for n in mixed["float_nodes"]]


def test_search_time_zero_keeps_best_found_and_fails_clearly(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    with pytest.raises(dlopt.errors.AccuracyBudgetExceeded) as info:
        dlopt.compile(models.outlier_mlp(), out=tmp_path / "out", precision="int8", inputs=tmp_path / "eval.npz",
                      runs=3, max_accuracy_drop=0.5, search_time=0)
    assert "closest: ort/int8" in str(info.value)
    # the closest model is written with its report, so the work is not lost
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["chosen"] is None and report["search"]["complete"] is False
    assert (tmp_path / "out" / "model.onnx").is_file()
