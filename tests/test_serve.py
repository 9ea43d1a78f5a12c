"""``dlopt serve``: a real Triton server (the nvidia-pytriton wheel's tritonserver) answers what dlopt.load computes.

The servers here are real processes started through the CLI on loopback ports the test picked; the
client is tritonclient's HTTP client; the metrics are Triton's own, parsed with prometheus-client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dlopt.deploy.serve import free_ports
from serving import dlopt_here, sigterm_during_load, triton_missing

http = pytest.importorskip("tritonclient.http", reason="dlopt serve's tests need tritonclient[http]")
parser = pytest.importorskip("prometheus_client.parser", reason="reading Triton's metrics needs prometheus-client")

DLOPT = Path(sys.executable).with_name("dlopt")
READY_S = 180  # a loaded 2-core machine: the server, the Python-backend stub and the runtime start in turn


pytestmark = pytest.mark.skipif(triton_missing() is not None, reason=f"no Triton server here: {triton_missing()}")


class Served:
    """``dlopt serve SOURCE`` on three free loopback ports; ready when it printed its one line."""

    def __init__(self, source: Path, *args: str) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process = subprocess.Popen(
            [str(DLOPT), "serve", str(source), "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
             "--metrics-port", str(self.metrics_port), "--ready-timeout", str(READY_S), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_S + 30)
        self.ready_line = lines[0].strip() if lines else ""
        if not self.ready_line.startswith("serving "):
            self.stop()
            raise AssertionError(f"dlopt serve did not say it was ready: {self.ready_line!r} {self.stderr!r}")
        self.url = f"127.0.0.1:{self.http_port}"

    def client(self):
        return http.InferenceServerClient(self.url, network_timeout=60.0, connection_timeout=10.0)

    def metrics(self) -> dict[str, float]:
        """Triton's counters for the model, by metric name (summed over labels)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        values: dict[str, float] = {}
        for family in parser.text_string_to_metric_families(text):  # a counter's samples come back as NAME_total
            for sample in family.samples:
                if sample.name in (family.name, f"{family.name}_total"):
                    values[family.name] = values.get(family.name, 0.0) + sample.value
        return values

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr = self.process.stderr.read()
        return self.process.returncode

    stderr = ""


def _infer(client, name: str, x: np.ndarray, input_name: str = "x", output: str = "logits") -> np.ndarray:
    tensor = http.InferInput(input_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(name, [tensor]).as_numpy(output)


@pytest.fixture(scope="module")
def served(ort_output):
    out, _ = ort_output
    server = Served(out)
    yield out, server
    assert server.stop() == 0, server.stderr


def test_triton_answers_what_dlopt_load_computes_bit_for_bit(served):
    import dlopt

    out, server = served
    assert server.ready_line.startswith(f"serving cnn (ort/fp32) at http://127.0.0.1:{server.http_port}")
    client = server.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cnn")
    config = client.get_model_config("cnn")
    assert config["backend"] == "python" and config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (1, 3, 8)]
    with dlopt.load(out) as runner:
        for x in batches:
            assert np.array_equal(_infer(client, "cnn", x), runner.run({"x": x})[0])
    client.close()
    # Triton's own count of what it answered: the client's three
    metrics = server.metrics()
    assert metrics["nv_inference_request_success"] == 3 and metrics["nv_inference_request_failure"] == 0
    assert metrics["nv_inference_count"] == 12  # samples: 1 + 3 + 8
    # the same over KServe V2 gRPC
    grpc = pytest.importorskip("tritonclient.grpc", reason="the gRPC client needs grpcio")
    with grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
        assert client.is_model_ready("cnn")
        tensor = grpc.InferInput("x", list(batches[1].shape), "FP32")
        tensor.set_data_from_numpy(batches[1])
        got = client.infer("cnn", [tensor], client_timeout=60).as_numpy("logits")
    with dlopt.load(out) as runner:
        assert np.array_equal(got, runner.run({"x": batches[1]})[0])


def test_a_request_the_model_cannot_take_is_an_error_answer_and_the_server_goes_on(served):
    _, server = served
    client = server.client()
    before = server.metrics()["nv_inference_request_failure"]
    with pytest.raises(Exception, match="x"):  # the wrong trailing shape: Triton refuses it against the config
        _infer(client, "cnn", np.zeros((1, 3, 8, 8), np.float32))
    assert _infer(client, "cnn", np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 10)
    assert server.metrics()["nv_inference_request_failure"] >= before
    client.close()


def test_sigterm_during_a_load_answers_every_request_sent_before_it_and_exits_0(ort_output):
    out, _ = ort_output
    server = Served(out, "--name", "cnn_load", "--max-queue-delay-us", "2000", "--instances", "2")
    assert "(ort/fp32)" in server.ready_line
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    before, status = sigterm_during_load(server, lambda client: _infer(client, "cnn_load", x).shape == (4, 10))
    assert len(before) >= 80
    failed = [r for r in before if not r[1]]
    assert not failed, failed[:3]
    assert status == 0, server.stderr
    assert "stopped cnn_load" in server.stderr
    assert not list(Path("/dev/shm").glob(f"dlopt_serve_{server.process.pid}_*"))


@pytest.mark.parametrize("args, message", [
    (["--host", "example.com"], "--host takes an IP address"),
    (["--http-port", "9000", "--grpc-port", "9000"], "ports must differ"),
    (["--http-port", "70000"], "--http-port takes a port from 1 to 65535"),
    (["--name", "../up"], "Triton model name '../up'"),
])
def test_bad_options_are_one_line_errors_before_any_server_starts(ort_output, args, message):
    out, _ = ort_output
    status, stderr = dlopt_here("serve", out, *args)  # the console script's own exit: the test below
    assert status == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_folder_dlopt_did_not_write_is_refused_in_one_line(tmp_path):
    """As its own process: the installed dlopt's exit status and its one line."""
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    result = subprocess.run([str(DLOPT), "serve", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, program) of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")[0].decode()))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_a_model_process_that_died_is_detected_and_dlopt_serve_exits_non_zero_in_one_line(ort_output):
    from dlopt.deploy.serve import STUB, ServeOptions
    from dlopt.deploy.serve import served as serving

    out, _ = ort_output
    x = np.zeros((1, 3, 16, 16), np.float32)
    # the symptom: Triton goes on saying the model is ready, and the requests its dead instance gets fail
    ports = dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))
    with serving(out, ServeOptions(name="cnn_dead", ready_timeout=READY_S, **ports), threading.Event()) as (srv, _):
        stubs = srv.backend_pids()
        assert len(stubs) == 1 and srv.dead_backends(stubs) == []
        client = http.InferenceServerClient(srv.url.removeprefix("http://"), network_timeout=60.0)
        assert _infer(client, "cnn_dead", x).shape == (1, 10)
        os.kill(next(iter(stubs)), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not srv.dead_backends(stubs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.dead_backends(stubs) == sorted(stubs)
        with pytest.raises(Exception, match="not healthy"):
            _infer(client, "cnn_dead", x)
        assert client.is_model_ready("cnn_dead")  # why readiness cannot tell
        client.close()
        # seen what was to be seen: a drain would wait out Triton's exit timeout (30 s) for the dead instance
        os.killpg(srv.process.pid, signal.SIGKILL)
        srv.process.wait(timeout=60)
    # dlopt serve: one line and a non-zero exit, the server and its other instance's process gone
    server = Served(out, "--name", "cnn_dies", "--instances", "2")
    try:
        (triton,) = [pid for pid, program in _children(server.process.pid) if program.endswith("tritonserver")]
        stubs = sorted(pid for pid, program in _children(triton) if program.endswith(STUB))
        assert len(stubs) == 2  # one per instance
        client = server.client()
        assert _infer(client, "cnn_dies", x).shape == (1, 10)
        client.close()
        os.kill(stubs[1], signal.SIGKILL)
        status = server.process.wait(timeout=60)
    finally:
        server.stop()
    lines = [line for line in server.stderr.splitlines() if line.startswith("dlopt:")]
    assert status == 2 and len(lines) == 1, server.stderr
    assert lines[0] == (f"dlopt: error: the process running model cnn_dies (Triton's Python-backend stub, pid "
                        f"{stubs[1]}) died; its requests would all fail, so the server was stopped")
    assert not any(Path(f"/proc/{pid}").exists() for pid in (triton, stubs[0]))


@pytest.fixture(scope="module")
def int8_output(tmp_path_factory):
    """A statically quantised (QDQ) ORT artefact of the small CNN, calibrated on dlopt's random inputs."""
    import models

    import dlopt

    root = tmp_path_factory.mktemp("int8-output")
    model = models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx")
    (root / "t.toml").write_text('[targets.here8]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["int8"]\n')
    report = dlopt.compile(model, target="here8", targets_file=root / "t.toml", out=root / "out", precision="int8",
                           samples=4, runs=5, warmup=1, max_accuracy_drop=100.0)
    assert report.chosen == "ort/int8"
    return root / "out"


def test_an_int8_artefact_counts_inputs_outside_its_calibration_range_on_metrics(int8_output):
    import onnx
    from onnx import numpy_helper

    # the range read independently: x's QuantizeLinear in the shipped model, uint8 levels 0..255
    graph = onnx.load(str(int8_output / "model.onnx")).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quant = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale, zero = float(consts[quant.input[1]]), int(consts[quant.input[2]])
    low, high = (0 - zero) * scale, (255 - zero) * scale
    server = Served(int8_output, "--name", "cnn8")
    try:
        assert "(ort/int8)" in server.ready_line
        client = server.client()
        inside = np.full((2, 3, 16, 16), (low + high) / 2, np.float32)
        _infer(client, "cnn8", inside)
        far = inside.copy()
        far[0, 0, :2, :5] = high * 3  # 10 values above the range
        far[1, 2, 0, :3] = low * 3  # 3 below
        _infer(client, "cnn8", far)
        client.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        assert server.stop() == 0, server.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in parser.text_string_to_metric_families(text) for s in f.samples}
    assert samples[("dlopt_input_out_of_range_total", (("input", "x"), ("model", "cnn8")))] == 13
    assert samples[("dlopt_model_info", (("key", "ort/int8"), ("model", "cnn8"), ("precision", "int8"),
                                         ("ran_as", "int8")))] == 1


def test_a_transformer_block_with_symbolic_batch_and_sequence_is_served_bit_for_bit(tmp_path):
    import models

    import dlopt

    model = models.save(models.attention_block(batch="N", seq="S"), tmp_path / "encoder.onnx")
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n')
    dlopt.compile(model, target="here", targets_file=tmp_path / "t.toml", out=tmp_path / "out", precision="fp32",
                  shapes={"x": [1, 8, 32]}, samples=2, runs=5, warmup=1)
    server = Served(tmp_path / "out")
    try:
        client = server.client()
        assert client.get_model_metadata("encoder")["inputs"][0]["shape"] == [-1, -1, 32]
        rng = np.random.default_rng(2)
        with dlopt.load(tmp_path / "out") as runner:
            for batch, seq in ((1, 8), (2, 5), (3, 17)):  # sequence lengths it was not timed at
                x = rng.standard_normal((batch, seq, 32)).astype(np.float32)
                assert np.array_equal(_infer(client, "encoder", x, output="y"), runner.run({"x": x})[0])
        client.close()
    finally:
        assert server.stop() == 0, server.stderr
