"""When plain INT8 misses the budget, the sensitive nodes stay in float and the budget holds."""

from __future__ import annotations

import json
import math

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
    assert int8.score.metric == "top-1 agreement" and int8.score.drop_pp > 10
    assert "over the budget of 2.0" in int8.reason


def test_mixed_meets_it_with_the_outlier_layers_in_float(fallback):
    tmp, report = fallback
    mixed = report.chosen_candidate()
    assert mixed.key == "ort/mixed" and mixed.status == "ok"
    assert mixed.score.drop_pp <= 2.0
    floats = [n["op_type"] for n in mixed.float_nodes]
    assert floats == ["Gemm", "Gemm"]  # the layers producing and consuming the outlier channel
    # the consumer of the outlier ranks first by its own INT8 error; its producer follows it into float,
    # since the quantiser rounds the outlier tensor at the producer's output too
    sensitive, producer = mixed.float_nodes
    search = report.search
    assert search["sensitivity"][0]["name"] == sensitive["name"]
    assert sensitive["error"] > 0.05 and all(sensitive["error"] > 100 * n["error"] for n in search["sensitivity"][1:])
    assert producer["feeds"] == sensitive["name"] and "feeds" not in sensitive
    assert search["met_budget"] and search["complete"] and search["nodes_considered"] == 3
    assert search["trials"] == 1 and search["ranking"] == "per-layer output error on 8 cached samples"
    assert 0 <= search["ranking_seconds"] <= search["seconds"]
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
    with pytest.raises(dlopt.core.errors.AccuracyBudgetExceeded) as info:
        dlopt.compile(models.outlier_mlp(), out=tmp_path / "out", precision="int8", inputs=tmp_path / "eval.npz",
                      runs=3, max_accuracy_drop=0.5, search_time=0)
    assert "closest: ort/int8" in str(info.value)
    # the closest model is written with its report, so the work is not lost
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["chosen"] is None and report["search"] is None
    # the closest was timed beside the original (a refused quantised candidate is timed, never chosen)
    assert "x the original's speed" in report["summary"] and "3 interleaved runs" in report["summary"]
    assert report["summary"].endswith("OVER THE ACCURACY BUDGET")
    no_time = "no time left to search mixed precision for ort (--search-time 0 s shared by all backends)"
    assert no_time in report["notes"]
    assert (tmp_path / "out" / "model.onnx").is_file()


def _chain(layers: int, outliers: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    """``layers`` orthogonal 16x16 MatMuls; each layer in ``outliers`` puts x0 * 1000 on output channel 0,
    which the next layer ignores: per-tensor INT8 of that tensor rounds every other channel away."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = np.linalg.qr(rng.standard_normal((16, 16)))[0].astype(np.float32)
        if i in outliers:
            w[:, 0] = 0.0
            w[0, 0] = 1000.0
        if i - 1 in outliers:
            w[0, :] = 1e-5
        out = "y" if i == layers - 1 else f"h{i}"
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"layer{i}"))
        prev = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])
    model = helper.make_model(helper.make_graph(nodes, "chain", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_search_needs_logarithmically_many_builds(tmp_path):
    (tmp_path / "dlopt.toml").write_text('[targets.ort-cpu]\nbase = "cpu"\nbackends = ["ort"]\n')
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((128, 16)).astype(np.float32))
    calib = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(8)]
    report = dlopt.compile(_chain(10, outliers=(3, 7)), target="ort-cpu", targets_file=tmp_path / "dlopt.toml",
                           out=tmp_path / "out", precision="int8", inputs=tmp_path / "eval.npz", calib=calib,
                           runs=3, max_accuracy_drop=10.0)
    int8 = next(c for c in report.candidates if c.key == "ort/int8")
    assert int8.status == "rejected" and int8.score.drop_pp > 50
    mixed = report.chosen_candidate()
    assert mixed.key == "ort/mixed" and mixed.score.drop_pp <= 10.0
    search = report.search
    n = search["nodes_considered"]
    assert n == 10 and search["met_budget"] and search["complete"]
    # the two layers reading the outliers rank first, far above the rest
    top, rest = search["sensitivity"][:2], search["sensitivity"][2:]
    assert {s["name"] for s in top} == {"layer4", "layer8"}
    assert min(s["error"] for s in top) > 0.5 > 0.01 > max(s["error"] for s in rest)
    # they stay in float with the layers producing the outliers, and nothing else
    assert sorted(f["name"] for f in mixed.float_nodes) == ["layer3", "layer4", "layer7", "layer8"]
    assert search["float_nodes"] == 4
    assert 1 <= search["trials"] <= 2 * math.ceil(math.log2(n)) + 2
