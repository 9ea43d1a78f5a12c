"""Batching sized for a latency objective (issue 26, item 3): real servers, real load, the choice used where it is used.

A two-configuration grid keeps this file short: batching off, and a largest batch of 8 with a 2 ms queue
delay, each served afresh by tritonserver and load-tested at concurrency 1 and 8 for 2 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import triton_missing

from dlopt.core.errors import ConfigError

pytest.importorskip("tritonclient.http", reason="load tests need tritonclient[http]")


pytestmark = pytest.mark.skipif(triton_missing() is not None, reason=f"no Triton server here: {triton_missing()}")

DLOPT = Path(sys.executable).with_name("dlopt")


@pytest.fixture(scope="module")
def tuned(ort_output, tmp_path_factory):
    """A copy of the shared output, tuned for p99 <= 5 s (every level holds it: the choice is the throughput)."""
    from dlopt.workflows.loadtest import parse_slo
    from dlopt.workflows.serve_tune import ServingConfig, record, tune

    out = tmp_path_factory.mktemp("tuned") / "out"
    shutil.copytree(ort_output[0], out)
    configs = [ServingConfig(0, 0, 1, 1), ServingConfig(8, 2000, 1, 1)]
    lines: list[str] = []
    result = tune(out, parse_slo("p99=5s"), configs=configs, concurrency=(1, 8), duration=2.0, warmup=0.5,
                  progress=lines.append)
    record(out, result)
    return out, result, lines


def test_every_configuration_is_served_and_measured_and_the_fastest_within_the_objective_is_chosen(tuned):
    out, result, lines = tuned
    assert [t.config.max_batch_size for t in result.trials] == [0, 8]
    for trial in result.trials:
        assert [lv.concurrency for lv in trial.levels] == [1, 8]
        assert all(lv.answered > 0 and lv.errors == 0 and lv.p99_ms <= 5000 for lv in trial.levels)
        assert trial.best is max(trial.levels, key=lambda lv: lv.throughput)
    assert result.chosen is max(result.trials, key=lambda t: t.throughput)
    assert any("[2/2] batch 8, delay 2000 us, 1 x 1 threads" in line for line in lines)
    # what was written: the curve, the choice, the objective and the machine
    serving = json.loads((out / "report.json").read_text())["serving"]
    assert serving["objective"] == "p99 <= 5000 ms" and serving["measured_on"]["cores"] >= 1
    assert serving["chosen"] == result.chosen.config.to_dict()
    assert [len(t["levels"]) for t in serving["trials"]] == [2, 2]
    assert serving["trials"][1]["levels"][1]["concurrency"] == 8
    assert "## Serving" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "<h2>Serving</h2>" in html and html.count("<polyline") == 2


def test_an_objective_nothing_holds_chooses_nothing(ort_output, tmp_path):
    from dlopt.workflows.loadtest import parse_slo
    from dlopt.workflows.serve_tune import ServingConfig, tune

    result = tune(ort_output[0], parse_slo("p50=0.001ms"), configs=[ServingConfig(0, 0, 1, 1)], concurrency=(1,),
                  duration=0.5, warmup=0.2)
    assert result.chosen is None and result.trials[0].best is None and result.to_dict()["chosen"] is None


def test_package_writes_the_tuned_batching_and_serve_uses_it(tuned, tmp_path):
    from dlopt.deploy.triton import read_config

    out, result, _ = tuned
    chosen = result.chosen.config
    done = subprocess.run([str(DLOPT), "package", str(out), "--triton", str(tmp_path / "repo")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = read_config(tmp_path / "repo" / "cnn" / "config.pbtxt")
    assert config.max_batch_size == chosen.max_batch_size and config.instance_group[0].count == chosen.instances
    if chosen.max_batch_size > 1:
        assert config.dynamic_batching.max_queue_delay_microseconds == chosen.max_queue_delay_us
    else:
        assert not config.HasField("dynamic_batching")
    # dlopt serve writes the same into the repository it serves (unless a batch size is asked for)
    from dlopt.deploy.serve import ServeOptions, write_repository

    model = write_repository(out, tmp_path / "served", ServeOptions())
    assert (model.config.max_batch_size, model.config.instance_group[0].count) == (chosen.max_batch_size,
                                                                                    chosen.instances)
    assert model.config.parameters["threads"].string_value == str(chosen.threads)
    model = write_repository(out, tmp_path / "asked", ServeOptions(max_batch_size=2))
    assert model.config.max_batch_size == 2 and model.config.instance_group[0].count == 1


def test_a_crafted_tuned_configuration_is_refused_in_one_line(tuned, tmp_path):
    from dlopt.deploy.serve import ServeOptions, write_repository

    out = tmp_path / "out"
    shutil.copytree(tuned[0], out)
    report = json.loads((out / "report.json").read_text())
    report["serving"]["chosen"]["instances"] = "9; rm -rf /"
    (out / "report.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match=r"serving.chosen.instances is '9; rm -rf /', not an integer"):
        write_repository(out, tmp_path / "repo", ServeOptions())


def test_a_fixed_batch_artefact_is_tuned_without_batching_and_says_why(tmp_path):
    import models

    import dlopt
    from dlopt.workflows.serve_tune import batching_blocker, grid

    model = models.save(models.conv_bn_relu(batch=1), tmp_path / "fixed.onnx")
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n')
    dlopt.compile(model, target="here", targets_file=tmp_path / "t.toml", out=tmp_path / "out", precision="fp32",
                  samples=2, runs=5, warmup=1)
    why = batching_blocker(tmp_path / "out")
    assert why is not None and why.startswith("x, logits have a fixed first dimension")
    assert {c.max_batch_size for c in grid(batchable=why is None, cores=2)} == {0}


def test_the_schema_checks_the_items_of_an_optional_array(tuned):
    from dlopt.report.schema import validate_report

    report = json.loads((tuned[0] / "report.json").read_text())
    report["serving"]["trials"][0]["levels"] = [{"throughput": -1}]
    with pytest.raises(ConfigError, match=r"serving.trials\[0\].levels\[0\].throughput must be a finite number, 0 or"):
        validate_report(report)


@pytest.mark.parametrize("args, message", [
    (["http://127.0.0.1:9", "--tune", "--slo", "p99=5ms"], "--tune serves an output folder afresh"),
    (["OUT", "--tune"], "give --slo"),
    (["OUT", "--tune", "--slo", "p99=5ms", "--rate", "10", "--instances", "2"], "drop --rate, --instances"),
])
def test_bad_tune_requests_are_one_line_errors(ort_output, args, message):
    args = [str(ort_output[0]) if a == "OUT" else a for a in args]
    done = subprocess.run([str(DLOPT), "loadtest", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
