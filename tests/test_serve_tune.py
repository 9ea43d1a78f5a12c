"""Batching sized for a latency objective (issue 26, item 3): real servers, real load, the choice used where it is used.

A two-configuration grid keeps this file short: batching off, and a largest batch of 8 with a 2 ms queue
delay, each served afresh by tritonserver in 2 rotated rounds and load-tested at concurrency 1 and 8 for
0.5 s a round (after 0.25 s of warm-up).  The choice rule (medians over the rounds, ranges, the simpler
configuration unless beaten) is tested on its own with made-up figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import dlopt_here, triton_missing

from dlopt.core.errors import ConfigError
from dlopt.report.sections.base import escape_markdown

from dlopt.workflows.loadtest import Level, parse_slo
from dlopt.workflows.serve_tune import Run, ServingConfig, Trial, choose, orders

pytest.importorskip("tritonclient.http", reason="load tests need tritonclient[http]")

needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=f"no Triton server here: {triton_missing()}")

DLOPT = Path(sys.executable).with_name("dlopt")


@pytest.fixture(scope="module")
def tuned(ort_output, tmp_path_factory):
    """A copy of the shared output, tuned for p99 <= 5 s (every level holds it: the choice is the throughput)."""
    from dlopt.workflows.loadtest import parse_slo
    from dlopt.workflows.serve_tune import ServingConfig, record, tune

    if triton_missing() is not None:
        pytest.skip(f"no Triton server here: {triton_missing()}")
    out = tmp_path_factory.mktemp("tuned") / "out"
    shutil.copytree(ort_output[0], out)
    configs = [ServingConfig(0, 0, 1, 1), ServingConfig(8, 2000, 1, 1)]
    lines: list[str] = []
    result = tune(out, parse_slo("p99=5s"), configs=configs, concurrency=(1, 8), duration=1.0, warmup=0.25, rounds=2,
                  progress=lines.append)
    record(out, result)
    return out, result, lines


def test_every_configuration_is_measured_in_rotated_rounds_and_the_choice_follows_the_rule(tuned):
    out, result, lines = tuned
    assert [t.config.max_batch_size for t in result.trials] == [0, 8]
    assert result.orders == ((0, 1), (1, 0)) and result.level_seconds == 0.5
    for k, trial in enumerate(result.trials):
        assert [(r.round, r.position) for r in trial.runs] == [(0, k), (1, 1 - k)]  # first once, last once
        for run in trial.runs:
            assert [lv.concurrency for lv in run.levels] == [1, 8]
            assert all(lv.answered > 0 and lv.errors == 0 and lv.p99_ms <= 5000 for lv in run.levels), lines
            assert run.best is max(run.levels, key=lambda lv: lv.throughput) and run.load_average >= 0
        figures = sorted(run.best.throughput for run in trial.runs)
        assert (trial.low, trial.high, trial.throughput) == (figures[0], figures[1], sum(figures) / 2)
    off, batched = result.trials
    assert result.chosen is (batched if batched.low > off.high else off)
    assert (result.chosen, result.why) == choose(result.trials, result.slo)
    assert any("round 2/2 [1/2] batch 8, delay 2000 us, 1 x 1 threads" in line for line in lines)
    # what was written: every round's levels, the order, the choice and why, the objective and the machine
    serving = json.loads((out / "report.json").read_text())["serving"]
    assert serving["objective"] == "p99 <= 5000 ms" and serving["measured_on"]["cores"] >= 1
    assert serving["rounds"] == 2 and serving["orders"] == [[0, 1], [1, 0]] and serving["why"] == result.why
    assert serving["chosen"] == result.chosen.config.to_dict()
    assert [[len(r["levels"]) for r in t["rounds"]] for t in serving["trials"]] == [[2, 2], [2, 2]]
    assert [r["position"] for r in serving["trials"][1]["rounds"]] == [1, 0]
    assert serving["trials"][1]["rounds"][1]["levels"][1]["concurrency"] == 8
    assert serving["trials"][0]["throughput_low"] == round(off.low, 2)
    markdown = (out / "report.md").read_text()
    assert "## Serving" in markdown and "median throughput/s" in markdown
    assert escape_markdown(f"Chosen: {result.why}") in markdown
    row = next(r for r in _cells(markdown) if r[0].startswith("batching off"))
    recorded = serving["trials"][0]  # report.md renders report.json's figures, rounded to 2 places there
    assert (row[1], row[3]) == ("2/2", f"{recorded['throughput_low']:.0f}-{recorded['throughput_high']:.0f}")
    html = (out / "report.html").read_text()
    assert "<h2>Serving</h2>" in html and html.count("<polyline") == 2 and html.count("<circle") == 8


def _trial(config: ServingConfig, figures) -> Trial:
    """A trial whose rounds measured ``figures`` requests/s at concurrency 4 (None: that round missed)."""
    runs = []
    for k, figure in enumerate(figures):
        level = (Level(4, None, int(figure), int(figure), 0, 1.0, 1.0, 2.0, 3.0, 4.0) if figure is not None
                 else Level(4, None, 10, 9, 1, 1.0, 1.0, 2.0, 3.0, 4.0))
        runs.append(Run(k, k, (level,), level if figure is not None else None))
    return Trial(config, tuple(runs))


OFF, OFF2 = ServingConfig(0, 0, 1, 2), ServingConfig(0, 0, 2, 1)
B4, B4_2, B16_2 = ServingConfig(4, 500, 1, 2), ServingConfig(4, 500, 2, 1), ServingConfig(16, 2000, 2, 1)
SLO = parse_slo("p99=20ms")


def test_a_faster_median_with_overlapping_ranges_keeps_batching_off():
    # last session's case: one high round is no reason to batch (the median gain, 1543, exceeds the overlap, 600)
    off, b4 = _trial(OFF, [3000, 3500, 3600]), _trial(B4_2, [1800, 5043, 5200])
    assert (off.throughput, off.low, off.high, b4.throughput) == (3500, 3000, 3600, 5043)
    chosen, why = choose([b4, off], SLO)
    assert chosen is off
    assert why == ("the simplest configuration that holds p99 <= 20 ms, batching off, 1 x 2 threads: median 3500/s "
                   "(3000-3600 over 3 rounds); no other's range lies above its range (the highest median, batch 4, "
                   "delay 500 us, 2 x 1 threads: median 5043/s (1800-5200 over 3 rounds))")


def test_a_range_above_batching_offs_beats_it_and_says_why():
    off, b4 = _trial(OFF, [3000, 3500, 3600]), _trial(B4_2, [3700, 5043, 5200])
    chosen, why = choose([off, b4], SLO)
    assert chosen is b4
    assert why == ("batch 4, delay 500 us, 2 x 1 threads: median 5043/s (3700-5200 over 3 rounds), the simplest "
                   "configuration whose range no other's lies above; batching off, 1 x 2 threads: median 3500/s "
                   "(3000-3600 over 3 rounds) lies below it")


def test_of_the_configurations_that_beat_batching_off_the_simplest_that_none_beats_wins():
    off = _trial(OFF, [1000, 1000, 1000])
    b4, b16 = _trial(B4, [1900, 2100, 2300]), _trial(B16_2, [2000, 2200, 2400])  # both above off, not apart
    chosen, why = choose([b16, off, b4], SLO)
    assert chosen is b4 and why.endswith("; the highest median, batch 16, delay 2000 us, 2 x 1 threads: median 2200/s "
                                         "(2000-2400 over 3 rounds), does not lie above it")
    b16 = _trial(B16_2, [2400, 2500, 2600])  # apart: the best beats the simpler one
    assert choose([off, b4, b16], SLO)[0] is b16


def test_a_simpler_configuration_no_other_beats_wins_over_one_that_beats_batching_off():
    # measured by bench/serving.py (demo CNN, load 9-15): batch 16 x 2 lies above batching off x 1, not above x 2
    off, off2 = _trial(OFF, [2151, 397, 1243]), _trial(OFF2, [3584, 3227, 1518])
    b16 = _trial(B16_2, [3367, 2799, 3507])
    chosen, why = choose([off, off2, b16], SLO)
    assert chosen is off2 and b16.throughput > off2.throughput
    assert why == ("batching off, 2 x 1 threads: median 3227/s (1518-3584 over 3 rounds), the simplest configuration "
                   "whose range no other's lies above; batching off, 1 x 2 threads: median 1243/s (397-2151 over 3 "
                   "rounds) lies below batch 16, delay 2000 us, 2 x 1 threads: median 3367/s (2799-3507 over 3 rounds); "
                   "the highest median, batch 16, delay 2000 us, 2 x 1 threads: median 3367/s (2799-3507 over 3 "
                   "rounds), does not lie above it")


def test_a_configuration_holds_the_objective_in_most_of_its_rounds_or_not_at_all():
    off, off2 = _trial(OFF, [None, None, 9000]), _trial(OFF2, [2000, 2100, 2200])
    assert not off.holds and off2.holds and off.throughput == 0.0
    chosen, why = choose([off, off2], SLO)
    assert chosen is off2 and why.startswith("the simplest configuration that holds p99 <= 20 ms, batching off, 2 x 1")
    assert choose([off], SLO) == (None, "no configuration holds p99 <= 20 ms in most of its rounds")
    assert _trial(B4, [None, 3000, 3100]).holds  # 2 of 3 rounds


def test_the_order_is_rotated_each_round_so_no_configuration_always_goes_first_or_last():
    ten = orders(10, 3)
    assert [o[0] for o in ten] == [0, 3, 6] and all(sorted(o) == list(range(10)) for o in ten)
    for k in range(10):
        places = [o.index(k) for o in ten]
        assert len(set(places)) == 3 and places != [0] * 3 and places != [9] * 3
    assert orders(2, 2) == [[0, 1], [1, 0]] and orders(3, 3) == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_an_old_single_round_report_still_renders(ort_output):
    from dlopt.report.data import Report
    from dlopt.report.schema import validate_report

    old = {"objective": "p99 <= 250 ms", "measured_on": {"machine": "x86_64", "cores": 2}, "seconds": 203.2,
           "load": "closed loop, single-sample requests", "batching_off_because": None,
           "trials": [{"max_batch_size": 0, "max_queue_delay_us": 0, "instances": 1, "threads": 2,
                       "levels": [{"concurrency": 4, "throughput": 1312.23, "p99_ms": 4.5}],
                       "throughput_at_objective": 1312.23, "best_concurrency": 4},
                      {"max_batch_size": 4, "max_queue_delay_us": 500, "instances": 2, "threads": 1,
                       "levels": [{"concurrency": 16, "throughput": 3039.3, "p99_ms": 9.25}],
                       "throughput_at_objective": 3039.3, "best_concurrency": 16}],
           "chosen": {"max_batch_size": 4, "max_queue_delay_us": 500, "instances": 2, "threads": 1},
           "chosen_throughput": 3039.3}
    report = {**ort_output[1], "serving": old}
    validate_report(json.loads(json.dumps(report)))
    cells = _cells(Report.from_dict(report).to_markdown(None))
    assert ["batching off, 1 x 2 threads", "1/1", "1312.2", "-", "4.5"] in cells
    assert ["batch 4, delay 500 us, 2 x 1 threads (chosen)", "1/1", "3039.3", "-", "9.25"] in cells


def _cells(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]


@needs_triton
def test_an_objective_nothing_holds_chooses_nothing(ort_output, tmp_path):
    from dlopt.workflows.serve_tune import tune

    result = tune(ort_output[0], parse_slo("p50=0.001ms"), configs=[ServingConfig(0, 0, 1, 1)], concurrency=(1,),
                  duration=0.25, warmup=0.1, rounds=1)
    assert result.chosen is None and result.trials[0].runs[0].best is None and result.to_dict()["chosen"] is None
    assert result.why == "no configuration holds p50 <= 0.001 ms in most of its rounds"


@needs_triton
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


@needs_triton
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


@needs_triton
def test_the_schema_checks_the_items_of_an_optional_array(tuned):
    from dlopt.report.schema import validate_report

    report = json.loads((tuned[0] / "report.json").read_text())
    report["serving"]["trials"][0]["rounds"][1]["levels"] = [{"throughput": -1}]
    with pytest.raises(ConfigError, match=r"serving.trials\[0\].rounds\[1\].levels\[0\].throughput must be a finite "
                                          r"number, 0 or"):
        validate_report(report)


@pytest.mark.parametrize("args, message", [
    (["http://127.0.0.1:9", "--tune", "--slo", "p99=5ms"], "--tune serves an output folder afresh"),
    (["OUT", "--tune"], "give --slo"),
    (["OUT", "--tune", "--slo", "p99=5ms", "--rate", "10", "--instances", "2"], "drop --rate, --instances"),
    (["OUT", "--tune-rounds", "2"], "--tune-rounds is the number of rounds of --tune; add --tune"),
    (["OUT", "--tune", "--slo", "p99=5ms", "--tune-rounds", "0"], "Invalid value for '--tune-rounds'"),
])
def test_bad_tune_requests_are_one_line_errors(ort_output, args, message):
    args = [str(ort_output[0]) if a == "OUT" else a for a in args]
    status, stderr = dlopt_here("loadtest", *args)  # in this process: the CLI's checks and exit codes
    assert status == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
