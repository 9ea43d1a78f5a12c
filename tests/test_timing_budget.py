"""Time spent where it can pay: hopeless candidates are spot-checked, and a timing budget that cuts runs says so."""

from __future__ import annotations

import json
import re

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from cli import dlopt as run_cli

import dlopt
from dlopt.core.errors import ConfigError
from dlopt.measure.timing import MIN_RUNS, Timing


def _targets(folder, backends) -> str:
    path = folder / "targets.toml"
    path.write_text(f'[targets.here]\nbase = "cpu"\nbackends = {json.dumps(backends)}\nprecisions = ["fp32"]\n')
    return str(path)


def _two_convs(channels: int, size: int) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool, channels in and out: untuned TVM's naive conv schedule."""
    rng = np.random.default_rng(0)
    scale = 1.0 / (3 * channels ** 0.5)
    inits = [numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * scale).astype(np.float32), n)
             for n in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "two_convs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    return model


def test_a_candidate_far_slower_than_the_original_is_spot_checked_and_never_timed(tmp_path):
    # untuned TVM runs two 32-channel 112x112 convs about 20x slower than ONNX Runtime on x86 (measured
    # on a loaded 2-core AVX2 machine: 541 ms against 28 ms), far past the 3x line and the 20 ms floor
    from dlopt.flow.evaluation import SLOW_CHECK_FEEDS, SLOW_FACTOR

    model = models.save(_two_convs(32, 112), tmp_path / "convs.onnx")
    seen: dict[str, list[tuple[int, int]]] = {}
    report = dlopt.compile(model, target="here", targets_file=_targets(tmp_path, ["ort", "tvm"]), out=tmp_path / "out",
                           precision="fp32", samples=12, runs=5, warmup=1, tuning_db=False, cache=False,
                           progress=lambda stage, done, total: seen.setdefault(stage, []).append((done, total)))
    by_key = {c.key: c for c in report.candidates}
    tvm, ort = by_key["tvm/fp32"], by_key["ort/fp32"]
    assert tvm.status == "rejected" and tvm.reason.startswith("too slow to compete"), tvm.reason
    ratio = float(re.search(r"(\d+)x the original's", tvm.reason).group(1))
    assert ratio >= SLOW_FACTOR
    # the original and ORT ran all 12 feeds; TVM only the first few, and its outputs still agree
    assert seen["original: outputs"][-1] == (12, 12) and seen["ort fp32: outputs"][-1] == (12, 12)
    assert seen["tvm fp32: outputs"] == [(i, SLOW_CHECK_FEEDS) for i in range(1, SLOW_CHECK_FEEDS + 1)]
    assert f"checked on {SLOW_CHECK_FEEDS} of 12 feeds only, not timed" in tvm.reason
    assert tvm.fidelity.min_cosine > 0.9999 and tvm.fidelity.max_rel_error < 1e-4
    # never timed: no latency, and the interleaved timing ran the original and ORT only
    assert tvm.measurement.latency is None and ort.measurement.latency["runs"] == 5
    assert report.chosen == "ort/fp32"


def test_a_tiny_timing_budget_cuts_the_runs_and_the_report_says_so(tmp_path):
    model = models.save(models.conv_bn_relu(), tmp_path / "cnn.onnx")
    out = tmp_path / "out"
    done = run_cli("compile", model, "--target", "here", "--targets-file", _targets(tmp_path, ["ort"]), "-o", out,
                   "--precision", "fp32", "--samples", "2", "--runs", "100", "--warmup", "1", "--timing-budget", "0.001",
                   "--no-cache", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for latency in [report["baseline"]["latency"], *(c["measurement"]["latency"] for c in report["candidates"])]:
        assert (latency["runs"], latency["runs_requested"], latency["budget_s"]) == (MIN_RUNS, 100, 0.001)
        assert Timing.from_dict(latency).cut == ("20 of 100 runs: the timing budget of 0.001 s was reached; "
                                         "--timing-budget S to change")
    assert report["timing"]["runs"] == MIN_RUNS
    cut = "20 of 100 runs: the timing budget of 0.001 s was reached; --timing-budget S to change"
    assert report["timing"]["cut"] == cut
    assert f"{cut} (interleaved)" in report["summary"]
    # the verdict says what it rests on: here 2 random inputs, said as such
    assert "on 2 random inputs (no --eval: a verdict on random data, not the task's)" in report["summary"]


def test_runs_within_the_timing_budget_are_not_called_cut(tmp_path):
    model = models.save(models.conv_bn_relu(), tmp_path / "cnn.onnx")
    report = dlopt.compile(model, target="here", targets_file=_targets(tmp_path, ["ort"]), out=tmp_path / "out",
                           precision="fp32", samples=2, runs=30, warmup=1, timing_budget_s=60, cache=False)
    latency = report.baseline.latency
    assert (latency["runs"], latency["runs_requested"], latency["budget_s"]) == (30, 30, 60)
    assert Timing.from_dict(latency).cut is None


@pytest.mark.parametrize("budget", [0, -1.0, float("inf"), "30"])
def test_a_timing_budget_must_be_a_positive_number_of_seconds(budget):
    with pytest.raises(ConfigError, match="timing.budget"):
        dlopt.CompileConfig.build("m.onnx", timing_budget_s=budget)


def test_help_documents_the_timing_budget():
    done = run_cli("compile", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--timing-budget SECONDS" in text and "[default: 30.0" in text
    assert "fewer runs than --runs" in text


def test_random_verdicts_on_classifiers_use_enough_samples_that_one_disagreement_is_a_tenth_of_the_budget(tmp_path):
    """Without --eval a classifier is scored by top-1 agreement: 20 samples made one disagreement cost 5 points
    against a 1-point budget; now 100 / (budget / 10) samples, batched 32 to a feed along a symbolic batch."""
    from dlopt.core.config import CompileConfig
    from dlopt.flow.driver import prepare

    model = models.save(models.conv_bn_relu(batch="N"), tmp_path / "cnn.onnx")
    for budget, samples in ((1.0, 1000), (2.0, 500), (0.05, 2000)):
        job = prepare(CompileConfig.build(model, out=tmp_path / "o", max_accuracy_drop=budget))
        assert job.data.samples == samples
        assert max(len(next(iter(f.values()))) for f in job.data.feeds) == 32
    assert prepare(CompileConfig.build(model, out=tmp_path / "o", samples=7)).data.samples == 7
    assert prepare(CompileConfig.build(model, out=tmp_path / "o", metric="cosine")).data.samples == 20
