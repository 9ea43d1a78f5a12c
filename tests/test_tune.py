"""`dlopt tune` and a compile that applies its database: real MetaSchedule trials on a tiny CNN."""

from __future__ import annotations

import json

import pytest

import models
from cli import dlopt

TVM_HERE = '[targets.tvm-here]\nbase = "cpu"\nbackends = ["tvm"]\n'


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    model = models.save(models.conv_bn_relu(channels=8, size=16), tmp / "m.onnx")
    (tmp / "dlopt.toml").write_text(TVM_HERE)
    done = dlopt("tune", model, "--target", "tvm-here", "--trials", "8", "--db", tmp / "db", "--json",
                 cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr
    return tmp, model, json.loads(done.stdout)


def test_tune_records_trials_per_model_and_target(tuned):
    tmp, _, result = tuned
    assert result["trials_in_db"] >= 8 and result["trials_run"] == result["trials_in_db"]
    assert 0 < result["tuned_tasks"] <= result["tasks"]
    db = tmp / "db"
    (meta_file,) = db.glob("*/*/meta.json")  # root/<model sha>/<target hash>/
    meta = json.loads(meta_file.read_text())
    assert meta["trials"] == result["trials_in_db"] and meta["target"]["kind"] == "llvm"
    assert str(meta_file.parent) == result["database"]


def _tvm_candidate(tmp, model, out, *extra) -> dict:
    done = dlopt("compile", model, "--target", "tvm-here", "-o", tmp / out, "--precision", "fp32", "--runs", "20",
                 "--tuning-db", tmp / "db", "--json", "-q", *extra, cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr
    return next(c for c in json.loads(done.stdout)["candidates"] if c["backend"] == "tvm")


def test_compile_applies_the_database_and_a_second_tune_runs_nothing(tuned):
    tmp, model, result = tuned
    tvm = _tvm_candidate(tmp, model, "out", "--no-cache")
    assert tvm["status"] == "ok" and tvm["fidelity"]["max_rel_error"] < 1e-4
    assert tvm["tuning"]["database"] == result["database"]
    assert tvm["tuning"]["tuned_tasks"] == result["tuned_tasks"] and tvm["tuning"]["tasks"] == result["tasks"]
    assert tvm["tuning"]["summary"].startswith(f"{result['tuned_tasks']} of {result['tasks']} tasks tuned")
    again = dlopt("tune", model, "--target", "tvm-here", "--trials", "8", "--db", tmp / "db", "--json", cwd=tmp,
                  timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["trials_run"] == 0


def test_no_tuning_builds_untuned(tuned):
    tmp, model, _ = tuned
    assert _tvm_candidate(tmp, model, "plain", "--no-tuning")["tuning"] is None


@pytest.mark.parametrize("args, message", [
    (["--target", "cpu-ort-only"], "has no TVM backend"),
    (["--time-budget", "soon"], "give a duration such as 90s"),
    (["--target", "rpi5"], "give --rpc-tracker"),
])
def test_bad_tune_requests_are_one_line_errors(tmp_path, args, message):
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    (tmp_path / "dlopt.toml").write_text('[targets.cpu-ort-only]\nbase = "cpu"\nbackends = ["ort"]\n')
    done = dlopt("tune", model, "--trials", "2", "--db", tmp_path / "db", *args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
