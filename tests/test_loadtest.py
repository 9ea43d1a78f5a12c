"""``dlopt loadtest``: closed and open loops against a real Triton server, counted against Triton's own metrics.

Servers are real (``dlopt serve`` on free loopback ports, or the one loadtest starts for a folder);
the client is tritonclient's HTTP client; durations are 1 s a level or less so the file stays short.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from dlopt.deploy.serve import free_ports
from dlopt.workflows import loadtest as lt

pytest.importorskip("tritonclient.http", reason="dlopt loadtest needs tritonclient[http]")
pytest.importorskip("prometheus_client.parser", reason="reading Triton's metrics needs prometheus-client")

from serving import triton_missing  # noqa: E402 - after the skips
from test_serve import DLOPT, Served  # noqa: E402

pytestmark = pytest.mark.skipif(triton_missing() is not None, reason=f"no Triton server here: {triton_missing()}")


def _loadtest(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(DLOPT), "loadtest", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _pgrep(text: str) -> str:
    return subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def served(ort_output):
    out, _ = ort_output
    server = Served(out)  # cnn, --instances 1, dynamic batching up to 8
    yield server
    assert server.stop() == 0, server.stderr


@pytest.fixture(scope="module")
def cnn(served):
    model = lt.resolve_model(f"http://{served.url}")
    return model, lt.random_feeds(model, batch=1, seed=0)


def _consistent(level: dict, duration: float) -> None:
    assert level["requests"] == level["answered"] + level["errors"]
    assert level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"] <= level["max_ms"]
    # the counted window runs to the last answer: a request sent just before the end answers at most one
    # max latency later, so answered/duration >= throughput >= answered/(duration + max latency)
    assert duration <= level["seconds"] <= duration + level["max_ms"] / 1000 + 0.01
    low, high = level["answered"] / (duration + level["max_ms"] / 1000 + 0.01), level["answered"] / duration
    assert low - 0.01 <= level["throughput"] <= high + 0.01


def test_closed_loop_json_counts_equal_tritons_own_count(served):
    before = served.metrics()["nv_inference_request_success"]
    done = _loadtest(f"http://{served.url}", "--concurrency", "1,4", "--duration", 1.0, "--warmup", 0, "--json",
                     "--slo", "p99=10s", "-q")
    assert done.returncode == 0, done.stderr
    levels = json.loads(done.stdout)
    assert [lv["concurrency"] for lv in levels] == [1, 4]
    for level in levels:
        _consistent(level, 1.0)
        assert level["errors"] == 0 and level["requests"] > 20
        assert level["slo"] == "holds" and "rate" not in level and "late" not in level
    # Triton counted what the client counted: every answered request, plus the one check request
    after = served.metrics()["nv_inference_request_success"]
    assert after - before == sum(lv["answered"] for lv in levels) + 1
    assert "p99 <= 10000 ms: highest throughput that holds it" in done.stderr
    best = max(levels, key=lambda lv: lv["throughput"])
    assert f"at concurrency {best['concurrency']} " in done.stderr


def test_open_loop_at_a_rate_the_server_holds_sends_rate_times_duration(served, cnn):
    model, feeds = cnn
    url = f"http://{served.url}"
    # constant arrivals: due every 25 ms, 40 in the 1 s counted after 0.25 s of warm-up, all sent
    steady = lt.run_open(url, model, feeds, 40, 1.0, 0.25, "constant")
    assert steady.due == 40 and steady.requests == 40 and steady.unsent == 0
    assert steady.answered == 40 and steady.errors == 0
    # a sender is free for nearly every request at 40/s (4 senders, ~1-20 ms answers): a stall of this
    # loaded machine (load 10+ on 2 cores) may make a few late, not a quarter of them
    assert steady.late <= 10
    _consistent(steady.to_dict(), 1.0)
    # Poisson arrivals: the count due is Poisson(rate x duration) = Poisson(100), 3 sd = 30; seeded, so fixed
    poisson = lt.run_open(url, model, feeds, 50, 2.0, 0.5, "poisson", seed=3)
    expected = np.sum(lt.schedule(50, 2.5, "poisson", 3) >= 0.5)
    assert poisson.due == expected and abs(poisson.due - 100) <= 3 * math.sqrt(100)
    assert poisson.requests == poisson.due and poisson.unsent == 0 and poisson.errors == 0


def test_open_loop_above_capacity_shows_the_queueing_a_closed_loop_hides(served, cnn):
    model, feeds = cnn
    url = f"http://{served.url}"
    closed = lt.run_closed(url, model, feeds, 1, 1.0, 0.0)
    # one instance: ~1000/s here at best; one sender to start with, one more whenever all are busy
    flood = lt.run_open(url, model, feeds, 3000, 1.0, 0.0, "constant", senders=1)
    assert closed.errors == 0 and flood.errors == 0
    # the closed loop waits for each answer, so its latencies stay those of an idle server; the open loop
    # counts from when each request was due, so the queue shows: its median is past the closed loop's p99
    assert flood.late + flood.unsent > 0 and flood.due == 3000 and 1 < flood.senders <= lt.MAX_SENDERS
    assert flood.p50_ms > closed.p99_ms and flood.p99_ms > flood.p50_ms
    slo = lt.Slo((("p99", 2 * closed.p99_ms),))
    assert lt.holds(closed, slo) and not lt.holds(flood, slo)


def test_error_answers_are_counted_and_the_load_goes_on(served, cnn):
    model, feeds = cnn
    too_big = {"x": np.zeros((64, 3, 16, 16), np.float32)}  # over the server's max batch of 8: refused
    level = lt.run_closed(f"http://{served.url}", model, [feeds[0], too_big], 2, 1.0, 0.0)
    # each worker alternates a good and a refused request, so the two counts differ by at most one per worker
    assert level.errors > 10 and abs(level.errors - level.answered) <= 2
    assert level.requests == level.answered + level.errors
    assert "batch-size must be <= 8" in level.first_error and not lt.holds(level, lt.parse_slo("p99=100s"))


def _level(**kw) -> lt.Level:
    base = dict(concurrency=None, rate=None, requests=100, answered=100, errors=0, seconds=1.0,
                p50_ms=5.0, p95_ms=9.0, p99_ms=12.0, max_ms=30.0)
    return lt.Level(**{**base, **kw})


def test_slo_verdict_and_summary():
    slo = lt.parse_slo("p99=20ms")
    assert slo == lt.Slo((("p99", 20.0),)) and lt.parse_slo("P95=0.01s,p99=20ms").limits == (("p95", 10.0),
                                                                                             ("p99", 20.0))
    one = _level(concurrency=1, answered=100)
    four = _level(concurrency=4, requests=300, answered=300, p99_ms=19.9)
    eight = _level(concurrency=8, requests=400, answered=400, p99_ms=20.1)
    assert [lt.holds(lv, slo) for lv in (one, four, eight)] == [True, True, False]
    assert lt.best([one, four, eight], slo) is four
    assert not lt.holds(_level(concurrency=2, requests=101, errors=1), slo)  # an error answer misses
    slow = _level(rate=100.0, due=100, late=0, unsent=0)
    fast = _level(rate=400.0, due=400, requests=390, answered=390, late=50, unsent=10, p99_ms=15.0)
    assert not lt.holds(fast, slo) and lt.best([slow, fast], slo) is slow  # unsent: the rate was not held
    lines = lt.summary([one, four, eight, slow, fast], slo)
    assert lines == ["p99 <= 20 ms: highest throughput that holds it 300.0/s at concurrency 4 (p99 19.90 ms)",
                     "p99 <= 20 ms: highest rate that holds it 100/s (100.0/s answered, p99 12.00 ms)"]
    assert lt.summary([eight], slo) == ["p99 <= 20 ms: no concurrency level holds it"]


def test_bad_inputs_are_one_line_errors(served, tmp_path):
    url = f"http://{served.url}"
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(tmp_path / "wrong.npz", y=np.zeros((4, 3, 16, 16), np.float32))
    cases = [
        ([f"http://127.0.0.1:{free_ports(1)[0]}"], "cannot reach a KServe V2 server at http://127.0.0.1:"),
        ([url, "--model", "nope"], "has no model 'nope'"),
        ([url, "--input", tmp_path / "text.npz"], "text.npz"),
        ([url, "--input", tmp_path / "wrong.npz"], "missing ['x'] and unexpected ['y']"),
        ([url, "--input", tmp_path / "wrong.npz", "--shape", "x=1x3x16x16"], "--shape sets the shapes of random"),
        ([url, "--batch", "64"], "cnn at http://"),  # over the server's max batch of 8: the check request fails
        ([url, "--concurrency", "1,x"], "--concurrency takes comma-separated numbers"),
        ([url, "--rate", "0"], "--rate takes comma-separated numbers above 0"),
        ([url, "--slo", "p99=20"], "--slo takes PERCENTILE=TIME"),
        ([url, "--slo", "p42=1ms"], "--slo takes PERCENTILE=TIME"),
        ([url, "--instances", "2"], "--instances configure the server dlopt starts"),
        ([tmp_path / "absent"], "is neither"),
        (["https://127.0.0.1:1"], "a server URL is http://HOST:PORT"),
    ]
    from click.testing import CliRunner

    from dlopt.cli.app import main

    for args, message in cases[1:]:  # in this process: the same command and exit-code mapping, no start-up
        result = CliRunner().invoke(main, ["loadtest", *map(str, args), "--duration", "0.5"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (args, result.stderr, result.exception)
        assert message in lines[0] and lines[0].startswith("dlopt: error: "), (args, lines[0])
    args, message = cases[0]
    done = _loadtest(*args, timeout=120)  # and one as its own process: an unreachable server
    assert done.returncode == 2 and done.stderr.startswith(f"dlopt: error: {message}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_folder_target_is_served_for_the_test_and_gone_after(ort_output, tmp_path):
    out, _ = ort_output
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the server's repository is made under tmp_path
    done = _loadtest(out, "--concurrency", 1, "--duration", 0.5, "--warmup", 0, "--slo", "p50=0.001ms",
                     "--max-batch-size", 0, env=env)
    assert done.returncode == 0, done.stderr
    assert "starting tritonserver for cnn (ort/fp32)" in done.stderr and "stopped cnn" in done.stderr
    table = done.stdout.splitlines()
    assert table[0].split()[:3] == ["load", "requests", "throughput/s"]
    assert table[2].startswith("concurrency 1") and table[2].split()[-1] == "misses"
    assert table[-1] == "p50 <= 0.001 ms: no concurrency level holds it"
    assert _pgrep(str(tmp_path)) == "" and not list(tmp_path.glob("dlopt-serve-*"))


def test_ctrl_c_stops_the_test_and_the_server_it_started(ort_output, tmp_path):
    out, _ = ort_output
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([str(DLOPT), "loadtest", str(out), "--concurrency", "2", "--duration", "60",
                                "--warmup", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any("concurrency 2:" in line for line in lines):
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
    assert _pgrep(str(tmp_path)), "".join(lines)  # the server and its stub run under tmp_path
    time.sleep(0.3)  # into the level it announced
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(lines) + stderr
    assert "interrupted after 0 level(s); the server it started was stopped" in stderr
    assert "stopped cnn" in stderr and stdout == ""
    assert _pgrep(str(tmp_path)) == "" and not list(tmp_path.glob("dlopt-serve-*"))
