"""A candidate's results are dataclasses inside dlopt and dictionaries only in report.json.

Score, Fidelity, the TVM tuning applied and the microcontroller figures are typed on the
``Candidate``; ``Report.to_json`` writes them exactly as before (same keys, order and rounding) and
``Report.from_dict`` rebuilds the types, so a report read back writes the same bytes.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest

import dlopt
from dlopt.flow.candidates import NNCF, ORT_DYNAMIC, ORT_STATIC, judge
from dlopt.measure.budget import Score
from dlopt.measure.fidelity import Fidelity
from dlopt.report.data import Candidate, Measurement, Report
from dlopt.report.sections.mcu import describe
from dlopt.targets.c.figures import McuFigures, QemuRun
from dlopt.targets.tvm.tuning_db import TuningApplied
from models import conv_bn_relu, save


@pytest.fixture(scope="module")
def ort_report(tmp_path_factory):
    """fp32, fp16 and int8 of a small CNN on ONNX Runtime only: (report, output folder)."""
    tmp = tmp_path_factory.mktemp("typed")
    model = save(conv_bn_relu(channels=4, size=8), tmp / "cnn.onnx")
    (tmp / "t.toml").write_text('[targets.ort-here]\nbase = "cpu"\nbackends = ["ort"]\n')
    report = dlopt.compile(model, target="ort-here", targets_file=tmp / "t.toml", out=tmp / "out", runs=5,
                           samples=8, max_accuracy_drop=100, progress=False)
    return report, tmp / "out"


def test_candidates_hold_typed_results_and_report_json_reads_back_byte_for_byte(ort_report):
    report, out = ort_report
    scored = [c for c in report.candidates if c.score is not None]
    assert len(scored) >= 3 and {c.precision for c in scored} >= {"fp32", "fp16", "int8"}
    for c in scored:
        assert isinstance(c.score, Score) and isinstance(c.fidelity, Fidelity)
        assert c.score == c.score.rounded()  # judged on what report.json keeps
        assert c.tuning is None and c.mcu is None
    int8 = next(c for c in scored if c.precision == "int8")
    assert int8.quantiser == f"onnxruntime {version('onnxruntime')} static"
    text = report.to_json()
    assert (out / "report.json").read_text() == text
    again = Report.from_dict(json.loads(text))
    assert again.to_json() == text  # byte for byte: keys, order and rounding
    assert [type(c.score) for c in again.candidates] == [type(c.score) for c in report.candidates]
    assert again.candidates[0].score == report.candidates[0].score
    raw = json.loads(text)["candidates"][0]
    assert list(raw["score"]) == ["metric", "value", "drop_pp"] and list(raw["fidelity"]) == [
        "max_abs_error", "max_rel_error", "min_cosine", "top1_agreement", "non_finite"]


def test_score_details_and_rounding_are_those_report_json_had():
    score = Score("cosine similarity (min per sample)", 0.99912345678, 0.087654321, (("mean_cosine", 0.9995555555),))
    assert score.to_dict() == {"metric": "cosine similarity (min per sample)", "value": 0.999123, "drop_pp": 0.0877,
                               "mean_cosine": 0.999556}
    assert Score.from_dict(score.to_dict()) == score.rounded()
    assert score.rounded().to_dict() == score.to_dict()
    # a test's or an old tool's record without a value still judges
    assert judge("int8", {"max_rel_error": 0.1}, {"metric": "cosine", "drop_pp": 2.5}, 1.0)[1] == (
        "accuracy budget: cosine drops 2.50 points, over the budget of 1.0")


def _report(cand: Candidate) -> Report:
    return Report(model={"path": "m.onnx"}, target={"name": "x"}, precision="auto", evaluation={"source": "random"},
                  baseline=Measurement(None, 10), budget={"metric": "m", "original": 1.0, "max_drop_pp": 1.0},
                  passes=[], candidates=[cand], chosen=cand.key, output_dir=None, dlopt_version="0", created="now")


def test_tuning_and_mcu_figures_round_trip_and_render_as_before():
    settings = {"tuning_db": "/db/abc", "tuned_tasks": 4, "tasks": 5, "tuning": "4 of 5 tasks tuned from /db/abc (64 trials)"}
    tuning = TuningApplied.from_settings(settings)
    assert tuning == TuningApplied("/db/abc", 4, 5, "4 of 5 tasks tuned from /db/abc (64 trials)")
    assert TuningApplied.from_settings({"tuning": "untuned (default Relax pipeline, no tuning database)"}) is None
    c_settings = {"mcpu": "cortex-m7", "memory": {"arena_bytes": 1280, "liveness_lower_bound_bytes": 1280},
                  "figures": {"flash_bytes": 9000, "ram_bytes": 2000, "compiler": "arm-none-eabi-gcc 13"},
                  "qemu": {"board": "mps2-an500", "samples": 4, "max_abs_diff": 0.0, "instructions_per_run": [12345],
                           "instructions_note": "n"}}
    mcu = McuFigures.from_settings(c_settings)
    assert mcu.qemu == QemuRun("mps2-an500", 4, 0.0, [12345], "n") and mcu.flash_bytes == 9000
    assert describe(mcu) == ("9000 B flash, 2000 B RAM for cortex-m7 (arm-none-eabi-gcc 13); arena 1280 B (liveness "
                              "lower bound 1280 B); qemu mps2-an500 gave the host's outputs on 4 inputs (max "
                              "difference 0.0e+00), 12,345 emulator instructions per run (a proxy, not device latency)")
    report = _report(Candidate("tvm", "fp32", "ok", tuning=tuning, mcu=mcu))
    data = json.loads(report.to_json())["candidates"][0]
    assert data["tuning"] == {"database": "/db/abc", "tuned_tasks": 4, "tasks": 5,
                              "summary": "4 of 5 tasks tuned from /db/abc (64 trials)"}
    assert list(data["mcu"]) == ["mcpu", "arena_bytes", "liveness_lower_bound_bytes", "flash_bytes", "ram_bytes",
                                 "sections", "stack_estimate_bytes", "compiler", "undefined_symbols",
                                 "figures_unavailable", "qemu"]
    assert data["mcu"]["qemu"] == c_settings["qemu"]
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.candidates[0].tuning == tuning and again.candidates[0].mcu == mcu
    assert again.to_json() == report.to_json()
    assert "; 4 of 5 tasks tuned from /db/abc (64 trials)" in again.candidate_rows()[1][-1]


def test_an_old_report_with_fewer_keys_still_loads():
    old = json.loads(_report(Candidate("ort", "int8", "ok")).to_json())
    old["candidates"][0].update(fidelity={"max_abs_error": 0.1, "max_rel_error": 0.01, "min_cosine": 0.99,
                                          "top1_agreement": 1.0},  # before non_finite
                                score={"metric": "top-1 agreement", "value": 1.0, "drop_pp": 0.0},
                                mcu={"arena_bytes": 64, "liveness_lower_bound_bytes": 64, "qemu": None, "later": 1},
                                speedup=None, unknown_key="ignored")
    cand = Report.from_dict(old).candidates[0]
    assert cand.fidelity.non_finite is None and cand.fidelity.max_rel_error == 0.01
    assert cand.score.drop_pp == 0.0 and cand.mcu.arena_bytes == 64 and cand.mcu.flash_bytes is None


def test_the_quantiser_is_a_type_with_today_s_labels():
    assert str(ORT_STATIC) == f"onnxruntime {version('onnxruntime')} static"
    assert str(ORT_DYNAMIC) == f"onnxruntime {version('onnxruntime')} dynamic"
    assert ORT_STATIC != ORT_DYNAMIC and ORT_STATIC.tool == ORT_DYNAMIC.tool == "onnxruntime"
    try:
        nncf = version("nncf")
    except ImportError:  # not installed (PackageNotFoundError): its label is never asked for
        return
    assert str(NNCF) == f"nncf {nncf}" and NNCF.mode is None
