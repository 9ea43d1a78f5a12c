"""``dlopt serve OUT --ray``: the artefact as a Ray Serve deployment (two replicas on a local Ray on
loopback), answering KServe V2 over HTTP for tritonclient's HTTP client as Triton does.

One ``dlopt serve --ray`` process (one local Ray) serves the module; its last test sends it SIGTERM
under load.  The client is tritonclient's; the counts are the server's statistics endpoint.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from serving import dlopt_here, sigterm_during_load

DLOPT = Path(sys.executable).with_name("dlopt")
READY_S = 240  # a loaded 2-core machine: Ray, Serve's controller and proxy, two replicas start in turn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(out: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(DLOPT), "serve", str(out), *args], capture_output=True, text=True, timeout=timeout)


def _one_line_exit_2(status: int, stderr: str, message: str) -> None:
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas is for Ray Serve: add --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1-3"], "--replicas and --autoscale exclude each other"),
    (["--ray", "--autoscale", "3-1"], "--autoscale MIN-MAX needs 1 <= MIN <= MAX, got 3-1"),
    (["--ray", "--autoscale", "many"], "--autoscale takes MIN-MAX replicas (e.g. 1-4), not 'many'"),
    (["--ray", "--instances", "2"], "--instances is Triton's; with --ray use --replicas/--autoscale"),
    (["--ray", "--host", "example.com"], "--host takes an IP address"),
    (["--ray", "--http-port", "70000"], "--http-port takes a port from 1 to 65535"),
    (["--ray", "--name", "../up"], "Triton model name '../up'"),
])
def test_bad_options_are_one_line_errors_before_ray_starts(ort_output, args, message):
    out, _ = ort_output
    # in this process (the CLI's own checks and exit codes); the console script as a process: the tests below
    _one_line_exit_2(*dlopt_here("serve", out, *args), message)


def test_without_ray_serve_it_says_what_to_install_in_one_line(ort_output):
    """Ray Serve missing (its import fails, as where `ray` lacks the serve extra's packages): one line."""
    from dlopt.core.errors import TargetUnavailable

    out, _ = ort_output
    code = ("import sys; sys.modules['ray.serve'] = None; from dlopt.cli.app import main; "
            f"sys.argv = ['dlopt', 'serve', {str(out)!r}, '--ray']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == TargetUnavailable.exit_code, result.stderr
    assert result.stderr.strip().splitlines() == [
        "dlopt: error: dlopt serve --ray needs Ray Serve: pip install 'dlopt[ray]'"], result.stderr


def test_the_v2_codec_round_trips_tritonclients_bodies_and_refuses_malformed_ones_in_one_line():
    """kserve_v2 on its own (no server): tritonclient's request bodies in, its InferResult reads what comes out."""
    client = pytest.importorskip("tritonclient.http", reason="the KServe V2 client is tritonclient[http]")
    from dlopt.core.errors import DataError
    from dlopt.deploy.kserve_v2 import decode_request, encode_response

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    ids = np.array([[1, -2]], np.int64)
    for binary in (True, False):
        a, b = client.InferInput("x", list(x.shape), "FP32"), client.InferInput("ids", [1, 2], "INT64")
        a.set_data_from_numpy(x, binary_data=binary)
        b.set_data_from_numpy(ids, binary_data=binary)
        asked = [client.InferRequestedOutput("y", binary_data=binary)]
        body, size = client.InferenceServerClient.generate_request_body([a, b], outputs=asked, request_id="7")
        request = decode_request(body, None if size is None else str(size))
        assert np.array_equal(request.feed["x"], x) and np.array_equal(request.feed["ids"], ids)
        assert request.id == "7" and request.outputs == ("y",)
        answer, headers = encode_response("m", request, ["y", "z"], [x * 2, ids])
        length = headers.get("Inference-Header-Content-Length")
        result = client.InferResult.from_response_body(answer, header_length=None if length is None else int(length))
        assert np.array_equal(result.as_numpy("y"), x * 2) and result.as_numpy("z") is None
        assert ("Inference-Header-Content-Length" in headers) is binary
    header = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'
    cases = [(header + bytes(8), str(len(header)), "binary_data_size 4 does not match shape [2]"),
             (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None,
              "input 'x': 'data' does not hold 3 FP32 values"),
             (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BF16", "data": [1]}]}', None,
              "datatype 'BF16' is not one of BOOL"),
             (b'{"inputs": []}' + bytes(4), "14", "4 bytes of binary data follow the tensors"),
             (b'{"inputs": []}', "99", "Inference-Header-Content-Length 99 does not fit a body of 14 bytes")]
    for body, length, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            decode_request(body, length)


def _missing() -> str | None:
    for module, why in (("ray.serve", "Ray Serve (pip install 'dlopt[ray]')"),
                        ("tritonclient.http", "tritonclient[http], the KServe V2 client"),
                        ("psutil", "psutil, to list Ray's processes and sockets")):
        try:
            __import__(module)
        except ImportError as exc:
            return f"needs {why}: {exc}"
    return None


needs_ray_serve = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
if _missing() is None:
    import psutil
    import tritonclient.http as http


@needs_ray_serve
def test_an_address_where_no_ray_answers_is_one_line_within_the_deadline(ort_output):
    """Joining a cluster has a deadline: --ready-timeout (here 5 s) bounds Ray's own retries."""
    from dlopt.core.errors import TargetUnavailable

    out, _ = ort_output
    start = time.monotonic()
    result = _serve(out, "--ray", f"127.0.0.1:{_free_port()}", "--ready-timeout", "5", "--http-port",
                    str(_free_port()))
    assert result.returncode == TargetUnavailable.exit_code, result.stderr
    assert time.monotonic() - start < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("dlopt: error:")]
    assert errors == [f"dlopt: error: --ray: reaching Ray at {result.args[4]} took more than 5 s; check the address "
                      f"and `ray status`"], result.stderr


class RayServed:
    """``dlopt serve OUT --ray --replicas 2`` on a free loopback port; ready when it printed its one line."""

    def __init__(self, source: Path, *args: str) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen([str(DLOPT), "serve", str(source), "--ray", "--replicas", "2", "--http-port",
                                         str(self.port), "--ready-timeout", str(READY_S), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_S + 60)
        self.ready_line = lines[0].strip() if lines else ""
        if not self.ready_line.startswith("serving "):
            self.stop()
            raise AssertionError(f"dlopt serve --ray did not say it was ready: {self.ready_line!r} {self.stderr!r}")
        self.processes = psutil.Process(self.process.pid).children(recursive=True)  # Ray's, started by it

    def client(self):
        return http.InferenceServerClient(f"127.0.0.1:{self.port}", network_timeout=60.0, connection_timeout=10.0)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/models/cnn/stats", timeout=30) as answer:
            return json.loads(answer.read())["model_stats"][0]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr = self.process.stderr.read()
        return self.process.returncode

    stderr = ""


def _infer(client, x: np.ndarray, *, binary: bool = True) -> np.ndarray:
    tensor = http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [http.InferRequestedOutput("logits", binary_data=binary)]
    return client.infer("cnn", [tensor], outputs=outputs).as_numpy("logits")


@pytest.fixture(scope="module")
def served(ort_output):
    out, _ = ort_output
    server = RayServed(out)
    yield out, server
    server.stop()  # the last test stops it under load and checks how


@needs_ray_serve
def test_replicas_answer_what_dlopt_load_computes_bit_for_bit_on_loopback_only(served):
    import dlopt

    out, server = served
    assert server.ready_line == f"serving cnn (ort/fp32) at http://127.0.0.1:{server.port} (Ray Serve, 2 replicas)"
    listening = set()
    for proc in [psutil.Process(server.process.pid), *server.processes]:
        try:
            listening.update((proc.name(), c.laddr.ip) for c in proc.net_connections(kind="inet")
                             if c.status == psutil.CONN_LISTEN)
        except psutil.Error:
            pass
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet", "ray::ProxyActor", "ray::ServeReplica:cnn:cnn"} <= names, listening
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening

    client = server.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cnn")
    meta = client.get_model_metadata("cnn")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    before = server.stats()
    rng = np.random.default_rng(0)
    with dlopt.load(out) as runner:
        for n in (1, 3, 8):
            x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
            want = runner.run({"x": x})[0]
            assert np.array_equal(_infer(client, x), want)  # binary-data extension both ways
            assert np.array_equal(_infer(client, x, binary=False), want)  # JSON tensors both ways
    after = server.stats()
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 6
    assert after["inference_count"] - before["inference_count"] == 24  # samples: 2 x (1 + 3 + 8)
    client.close()


@needs_ray_serve
def test_a_request_the_model_cannot_take_is_a_v2_error_answer_and_the_server_goes_on(served):
    _, server = served
    client = server.client()
    with pytest.raises(http.InferenceServerException, match=r"\[400\] input 'x' has shape \[1, 3, 8, 8\]"):
        _infer(client, np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(http.InferenceServerException, match=r"\[404\] unknown model 'nope'"):
        client.get_model_metadata("nope")
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/v2/models/cnn/infer", data=b"{not json",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "malformed" in json.loads(refused.value.read())["error"]
    assert _infer(client, np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 10)
    client.close()


@needs_ray_serve
def test_concurrent_clients_are_answered_alike_and_the_batcher_forms_batches(served):
    import dlopt

    out, server = served
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    with dlopt.load(out) as runner:
        want = [runner.run({"x": x})[0] for x in xs]
    got: dict[int, list[np.ndarray]] = {}
    before = server.stats()

    def load(k: int) -> None:
        client = server.client()  # one client per thread: tritonclient's HTTP client is not thread-safe
        got[k] = [_infer(client, xs[k]) for _ in range(12)]
        client.close()

    threads = [threading.Thread(target=load, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(got) == list(range(8)) and all(len(v) == 12 for v in got.values())
    for k, answers in got.items():  # a sample's logits do not depend on the batch it ran in (ORT's CPU conv)
        for answer in answers:
            np.testing.assert_allclose(answer, want[k], rtol=1e-5, atol=1e-6)
    after = server.stats()
    requests = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    runs = after["execution_count"] - before["execution_count"]
    assert requests == 96 and after["inference_count"] - before["inference_count"] == 96
    assert runs < requests, (runs, requests)  # requests shared model runs
    batched = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert max(batched) > 1 and max(batched) <= 8, batched  # the default max batch size: 8 samples


@needs_ray_serve
def test_dlopt_loadtest_drives_it_as_it_drives_triton(served):
    _, server = served
    before = server.stats()["inference_stats"]["success"]["count"]
    result = subprocess.run([str(DLOPT), "loadtest", f"http://127.0.0.1:{server.port}", "--model", "cnn",
                             "--concurrency", "1,4", "--duration", "1", "--warmup", "0.5", "--json", "-q"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    levels = json.loads(result.stdout)
    assert [level["concurrency"] for level in levels] == [1, 4]
    assert all(level["requests"] > 0 and level["errors"] == 0 and level["p99_ms"] > 0 for level in levels), levels
    served_now = server.stats()["inference_stats"]["success"]["count"] - before
    assert served_now >= sum(level["requests"] for level in levels)  # and the warm-up and check requests


@needs_ray_serve
def test_sigterm_during_a_load_answers_every_request_sent_before_it_exits_0_and_leaves_no_ray(served):
    _, server = served
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    before, status = sigterm_during_load(server, lambda client: _infer(client, x).shape == (4, 10))
    assert len(before) >= 80
    failed = [r for r in before if not r[1]]
    assert not failed, failed[:3]
    assert status == 0, server.stderr
    assert "stopped cnn" in server.stderr
    time.sleep(1)  # Ray's processes end as its raylet and GCS stop
    left = []
    for proc in server.processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.NoSuchProcess:
            pass
    assert not left and len(server.processes) >= 5, left
