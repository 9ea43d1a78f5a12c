"""`dlopt tune` and a compile that applies its database: real MetaSchedule trials on a tiny CNN."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

import models
from cli import dlopt
from serving import dlopt_here

TVM_HERE = '[targets.tvm-here]\nbase = "cpu"\nbackends = ["tvm"]\n'
# One thread: TVM's pool of two spins against each other on a loaded 2-core machine (28 ms a run, not 0.1)
ONE = ("--threads", "1")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    model = models.save(models.conv_bn_relu(channels=8, size=16), tmp / "m.onnx")
    (tmp / "dlopt.toml").write_text(TVM_HERE)
    done = dlopt("tune", model, "--target", "tvm-here", "--trials", "8", "--db", tmp / "db", "--json", *ONE,
                 cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr
    return tmp, model, json.loads(done.stdout)


def test_tune_records_trials_per_model_and_target(tuned):
    tmp, _, result = tuned
    # exactly --trials: MetaSchedule checks its limit only before a round (8 ran 9 on this model's 4 tasks)
    assert result["trials_in_db"] == 8 and result["trials_run"] == 8
    assert 0 < result["tuned_tasks"] <= result["tasks"]
    db = tmp / "db"
    (meta_file,) = db.glob("*/*/meta.json")  # root/<model sha>/<target hash>/
    meta = json.loads(meta_file.read_text())
    assert meta["trials"] == result["trials_in_db"] and meta["target"]["kind"] == "llvm"
    assert str(meta_file.parent) == result["database"]


def _compile(tmp, model, out, *extra) -> tuple[dict, str]:
    """(the TVM candidate of report.json, what the compile printed)."""
    done = dlopt("compile", model, "--target", "tvm-here", "-o", tmp / out, "--precision", "fp32", "--runs", "20",
                 "--tuning-db", tmp / "db", "-q", *ONE, *extra, cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp / out / "report.json").read_text())
    return next(c for c in report["candidates"] if c["backend"] == "tvm"), done.stdout


def test_compile_applies_the_database_and_says_so_everywhere(tuned):
    tmp, model, result = tuned
    tvm, printed = _compile(tmp, model, "out", "--no-cache")
    assert tvm["status"] == "ok" and tvm["fidelity"]["max_rel_error"] < 1e-4
    assert tvm["tuning"]["database"] == result["database"]
    assert tvm["tuning"]["tuned_tasks"] == result["tuned_tasks"] and tvm["tuning"]["tasks"] == result["tasks"]
    said = f"{result['tuned_tasks']} of {result['tasks']} tasks tuned from {result['database']} (8 trials)"
    assert tvm["tuning"]["summary"] == said
    (row,) = [line for line in printed.splitlines() if line.startswith("tvm ")]  # the CLI table
    assert row.rstrip().endswith(f"; {said}")
    assert f"; {said} |" in (tmp / "out" / "report.md").read_text()
    # the README describes what ships: the TVM library, unless it was slower than the original here
    shipped = [line for line in (tmp / "out" / "README.md").read_text().splitlines()
               if line.startswith("| top level | tvm/fp32 |")]
    assert [f"; {said}; " in line for line in shipped] == ([True] if tvm["artifact_dir"] == "." else [])
    assert f"; {said}</td>" in (tmp / "out" / "report.html").read_text()


def test_a_second_tune_runs_nothing(tuned):
    tmp, model, _ = tuned
    again = dlopt("tune", model, "--target", "tvm-here", "--trials", "8", "--db", tmp / "db", "--json", *ONE, cwd=tmp,
                  timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["trials_run"] == 0


def test_no_tuning_builds_untuned(tuned):
    tmp, model, _ = tuned
    tvm, printed = _compile(tmp, model, "plain", "--no-tuning")
    assert tvm["tuning"] is None and "tasks tuned" not in printed


def test_more_trials_run_exactly_the_rest_and_the_estimate_only_falls(tuned):
    tmp, model, result = tuned
    # 2 more than the 8 in the database (3 ran the same rounds of one trial, one more of them)
    done = dlopt("tune", model, "--target", "tvm-here", "--trials", "10", "--db", tmp / "db", *ONE, cwd=tmp,
                 timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"; 2 new trials (10 in {result['database']})" in done.stdout
    # every task has records: the whole model's estimate shows from the first round, and never rises
    found = [float(ms) for ms in re.findall(r"model ~([\d.]+) ms estimated", done.stderr)]
    assert found and found == sorted(found, reverse=True), done.stderr
    assert "kernels ~" not in done.stderr and "2/2 trials" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "cpu-ort-only"], "has no TVM backend"),
    (["--time-budget", "soon"], "give a duration such as 90s"),
    (["--target", "rpi5"], "give --rpc-tracker"),
])
def test_bad_tune_requests_are_one_line_errors(tmp_path, args, message):
    """In this process (tests/serving.py ``dlopt_here``: the console script's command, checks and exit codes
    without its start-up): each is refused before any TVM work."""
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    (tmp_path / "dlopt.toml").write_text('[targets.cpu-ort-only]\nbase = "cpu"\nbackends = ["ort"]\n')
    with contextlib.chdir(tmp_path):
        code, err = dlopt_here("tune", model, "--trials", "2", "--db", tmp_path / "db", *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "db").exists()
