"""Prometheus exposition of a compile's figures, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import http.server
import threading

import pytest
from click.testing import CliRunner


prom_parser = pytest.importorskip("prometheus_client.parser",
                                  reason="metrics export needs prometheus-client (pip install 'dlopt[prometheus]')")

from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.cli.gate import gate  # noqa: E402
from dlopt.cli.package import package  # noqa: E402


@pytest.fixture(scope="module")
def compiled(ort_output):
    return ort_output


def _samples(text: str) -> dict:
    """(metric name, frozenset of labels) -> value, through the client's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in prom_parser.text_string_to_metric_families(text) for s in family.samples}


def _check(samples: dict, report: dict) -> None:
    common = {("model", "cnn.onnx"), ("target", "here")}
    for cand in [c for c in report["candidates"] if c["status"] == "ok"]:
        key = f"{cand['backend']}/{cand['precision']}"
        labels = common | {("candidate", key), ("backend", cand["backend"]), ("precision", cand["precision"]),
                           ("chosen", "true" if cand["chosen"] else "false")}
        lat = cand["measurement"]["latency"]
        assert samples["dlopt_latency_seconds", frozenset(labels | {("quantile", "0.5")})] == \
            pytest.approx(lat["p50_ms"] / 1e3)
        assert samples["dlopt_latency_seconds", frozenset(labels | {("quantile", "0.99")})] == \
            pytest.approx(lat["p99_ms"] / 1e3)
        assert samples["dlopt_speedup_ratio", frozenset(labels)] == pytest.approx(cand["speedup"])
        assert samples["dlopt_accuracy_drop_points", frozenset(labels)] == pytest.approx(cand["score"]["drop_pp"])
        assert samples["dlopt_artifact_size_bytes", frozenset(labels)] == cand["measurement"]["size_bytes"]
        assert samples["dlopt_energy_joules_per_inference", frozenset(labels)] == \
            pytest.approx(cand["measurement"]["energy"]["joules_per_inference"])
    original = common | {("candidate", "original"), ("backend", "original"), ("precision", "fp32"),
                         ("chosen", "false")}
    assert samples["dlopt_latency_seconds", frozenset(original | {("quantile", "0.5")})] == \
        pytest.approx(report["baseline"]["latency"]["p50_ms"] / 1e3)
    assert samples["dlopt_report_timestamp_seconds", frozenset(common | {("chosen_candidate", report["chosen"])})] > 0


def test_metrics_file(compiled, tmp_path):
    out, report = compiled
    path = tmp_path / "dlopt.prom"
    result = CliRunner().invoke(package, [str(out), "--metrics-file", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    text = path.read_text()
    _check(_samples(text), report)
    assert sum(c["status"] == "ok" for c in report["candidates"]) == 2  # fp32 and int8 both measured
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dlopt.prom"]  # no temp file left for the collector
    # a gate adds its results; the file is replaced because dlopt wrote it
    result = CliRunner().invoke(gate, [str(out), "--max-accuracy-drop", "100", "--metrics-file", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    samples = _samples(path.read_text())
    _check(samples, report)
    common = {("model", "cnn.onnx"), ("target", "here")}
    assert samples["dlopt_gate_passed", frozenset(common | {("gate", "accuracy-drop"), ("status", "passed")})] == 1
    assert ("dlopt_gate_measured", frozenset(common | {("gate", "accuracy-drop"), ("unit", "pp")})) in samples


def test_refuses_someone_elses_file(compiled, tmp_path):
    out, _ = compiled
    theirs = tmp_path / "node.prom"
    theirs.write_text("# TYPE node_load1 gauge\nnode_load1 0.5\n")
    result = CliRunner().invoke(package, [str(out), "--metrics-file", str(theirs)])
    assert isinstance(result.exception, ConfigError) and "did not write" in str(result.exception)
    assert theirs.read_text() == "# TYPE node_load1 gauge\nnode_load1 0.5\n"


class _Gateway(http.server.BaseHTTPRequestHandler):
    """Accepts a push the way a Pushgateway does (PUT /metrics/job/<job>/<label>/<value>...)."""

    pushes: list = []

    def do_PUT(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.pushes.append((self.path, self.headers.get("Content-Type"), body.decode()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_pushgateway(compiled):
    out, report = compiled
    server = http.server.HTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        result = CliRunner().invoke(package, [str(out), "--pushgateway", url])
        assert result.exit_code == 0, (result.output, result.exception)
    finally:
        server.shutdown()
        server.server_close()
    [(path, content_type, body)] = _Gateway.pushes
    assert path == "/metrics/job/dlopt/model/cnn.onnx/target/here"
    assert content_type.startswith("text/plain")
    _check(_samples(body), report)
    # nothing listening: one clear error
    result = CliRunner().invoke(package, [str(out), "--pushgateway", url])
    assert isinstance(result.exception, ConfigError) and "cannot push" in str(result.exception)
