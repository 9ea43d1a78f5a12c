"""MagnitudePrunePass and `dlopt compile --prune`: exact sparsity per layer, nothing else touched."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import models
from cli import dlopt
from helpers import random_feed, run_ort

from dlopt.passes import MagnitudePrunePass, generic_passes
from dlopt.core.pipeline import run_pipeline


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_each_layer_gets_exactly_the_requested_sparsity_and_only_its_smallest_weights_go():
    proto = models.conv_bn_relu(channels=8, size=16)
    model = ir.serde.deserialize_model(proto)
    before = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    pass_ = MagnitudePrunePass(sparsity=0.6, min_elements=16)
    result = pass_(model)
    assert result.modified
    after = {v.name: v.const_value.numpy() for v in result.model.graph.initializers.values()}
    pruned = {layer.name: layer for layer in pass_.layers}
    assert sorted(pruned) == ["fc_w", "w"]  # the Conv's and the MatMul's weights; not biases or BN parameters
    w0, w1 = before["w"], after["w"]
    assert int((w1 == 0).sum()) == int(np.floor(0.6 * w0.size))
    assert pruned["w"].sparsity_after == pytest.approx(np.floor(0.6 * w0.size) / w0.size)
    # the zeros are the smallest magnitudes, the rest is unchanged
    kept = w1 != 0
    assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()
    assert np.array_equal(w0[kept], w1[kept])
    assert all(np.array_equal(before[n], after[n]) for n in before if n not in pruned)
    assert (after["fc_w"] == 0).sum() == int(np.floor(0.6 * before["fc_w"].size))
    fc = before["fc_w"].size
    assert pass_.sparsity == pytest.approx((np.floor(0.6 * w0.size) + np.floor(0.6 * fc)) / (w0.size + fc))
    assert "not speed" in pass_.note and "deflate-compressed" in pass_.note
    # still a valid model that ONNX Runtime runs
    out = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(out)
    feed = random_feed(out)
    assert run_ort(out, feed)[0].shape == run_ort(proto, feed)[0].shape


def test_the_generic_pipeline_prunes_after_batchnorm_folding_only_when_asked():
    proto = models.conv_bn_relu(channels=8, size=16)
    assert not any(isinstance(p, MagnitudePrunePass) for p in generic_passes())
    passes = generic_passes(prune=0.5)
    names = [type(p).__name__ for p in passes]
    assert names.index("MagnitudePrunePass") > names.index("FoldBatchNormPass")
    model = run_pipeline(ir.serde.deserialize_model(proto), passes).model
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight = conv.inputs[1].const_value.numpy()
    assert (weight == 0).sum() == weight.size // 2


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2])
def test_sparsity_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="between 0 and 1"):
        MagnitudePrunePass(sparsity=bad)


def test_compile_prune_reports_the_sparsity_reached_and_writes_it(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(models.conv_bn_relu(channels=16, size=16), str(model))
    out = tmp_path / "out"
    # ONNX Runtime only: the pass is the subject, and an ORT artefact always carries the zeros checked below
    # (the cpu preset's uncached OpenVINO and TVM builds added ~3 CPU-s and nothing this test reads)
    targets = tmp_path / "t.toml"
    targets.write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n')
    done = dlopt("compile", model, "--target", "here", "--targets-file", targets, "--precision", "fp32",
                 "--prune", "0.5", "-o", out, "--runs", "10", "--samples", "5", "--json", "--no-cache")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    record = next(p for p in report["passes"] if p["name"] == "MagnitudePrunePass")
    assert record["modified"] and "50.0% of their" in record["note"] and "not speed" in record["note"]
    assert json.loads((out / "manifest.json").read_text())["options"]["prune"] == 0.5
    # asked for: a pruned artefact ships even where dense kernels make it no faster than the original
    assert report["chosen"] not in (None, "ort/original"), report["verdict"]
    assert "original model ships" not in report["verdict"]["why"]
    assert report["chosen"].startswith("ort/")  # an ORT artefact: the zeros are in its model.onnx
    weights = [w for w in _weights(onnx.load(str(out / "model.onnx"))).values() if w.ndim == 4]
    assert weights and all((w == 0).mean() >= 0.5 for w in weights)
    bad = dlopt("compile", model, "--prune", "1.5", "-o", tmp_path / "bad")
    assert bad.returncode == 2
    assert "--prune is the fraction" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
