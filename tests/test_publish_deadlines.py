"""The publish step against servers that misbehave on purpose (loopback, bench/hostile_servers.py):
a bounded wall time, one line naming the surface and the step, and nothing uploaded from outside
the output folder."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import dlopt

from dlopt.core.errors import ConfigError, DloptError, TargetUnavailable
from dlopt.cli.package import package
from dlopt.deploy.options import Deadline, within

LIMIT = 3.0  # --publish-timeout in these tests
SLACK = 4.0  # what the bounded step may take beyond it on a loaded machine (in-process)


def _bench():
    key = "dlopt_bench_hostile_servers"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).parents[1] / "bench" / "hostile_servers.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def _package(out, *args) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    result = CliRunner().invoke(package, [str(out), *args, "--publish-timeout", f"{LIMIT:g}"])
    return result.exception, time.monotonic() - start


def _one_line(exc: BaseException | None) -> str:
    assert isinstance(exc, DloptError), repr(exc)  # never an internal error
    assert "\n" not in str(exc)
    return str(exc)


@pytest.mark.parametrize("kind", ["never", "drip"])
def test_pushgateway_that_never_finishes_answering(ort_output, kind):
    pytest.importorskip("prometheus_client", reason="--pushgateway needs prometheus-client")
    out, _ = ort_output
    with _bench().HostileServer(kind) as server:
        exc, took = _package(out, "--pushgateway", server.url)
        assert server.connections >= 1
    message = _one_line(exc)
    assert isinstance(exc, TargetUnavailable)
    assert LIMIT - 0.5 < took < LIMIT + SLACK, took  # was past 240 s for a drip-feed
    assert message.startswith(f"--pushgateway {server.url}: no complete answer within 3 s")
    assert "while pushing the metrics" in message and "--publish-timeout" in message


def test_pushgateway_garbage_is_one_line(ort_output):
    """http.client.BadStatusLine is no OSError: it was exit 70."""
    pytest.importorskip("prometheus_client", reason="--pushgateway needs prometheus-client")
    out, _ = ort_output
    with _bench().HostileServer("garbage") as server:
        exc, took = _package(out, "--pushgateway", server.url)
    message = _one_line(exc)
    assert isinstance(exc, ConfigError) and took < LIMIT
    assert message.startswith(f"--pushgateway {server.url}: cannot push the metrics: the server's answer is not HTTP")
    assert "BadStatusLine: \\x00\\x17SSH-2.0-not-http" in message and message.isprintable()  # its bytes never reach a terminal


@pytest.mark.parametrize("kind", ["never", "drip", "garbage"])
def test_mlflow_server_that_misbehaves(ort_output, kind):
    """MLflow's client retries with backoff inside one call: never-answer and drip-feed ran past 400 s
    and garbage took 253 s to fail; the upload runs in a thread abandoned at the deadline."""
    pytest.importorskip("mlflow", reason="--mlflow needs mlflow (pip install 'dlopt[mlflow]')")
    out, _ = ort_output
    with _bench().HostileServer(kind) as server:
        exc, took = _package(out, "--mlflow", server.url)
        assert server.connections >= 1
    message = _one_line(exc)
    assert took < LIMIT + SLACK, took
    assert message.startswith(f"--mlflow {server.url}")
    if isinstance(exc, TargetUnavailable):  # garbage may also fail sooner, as MLflow's own error
        assert "no complete answer within 3 s (--publish-timeout) while looking up experiment dlopt" in message


@pytest.mark.parametrize("kind", ["drip", "garbage"])
def test_the_cli_gives_up_within_its_limit(ort_output, tmp_path, kind):
    """The real console script, to a drip-feeding or garbage-speaking MLflow: exit code, one line (no
    urllib3 retry warnings), bounded wall time (the abandoned upload thread does not hold the process
    at exit)."""
    pytest.importorskip("mlflow", reason="--mlflow needs mlflow (pip install 'dlopt[mlflow]')")
    out, _ = ort_output
    with _bench().HostileServer(kind) as server:
        start = time.monotonic()
        done = dlopt("package", out, "--mlflow", server.url, "--publish-timeout", "4", cwd=tmp_path, timeout=120)
        took = time.monotonic() - start
    assert done.returncode == TargetUnavailable.exit_code, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "no complete answer within 4 s (--publish-timeout)" in line
    assert took < 4 + 40, took  # 40 s: starting dlopt and importing MLflow on a loaded 2-core machine


def test_the_step_that_timed_out_is_named():
    deadline = Deadline(0.5)

    def upload(step):
        step("logging params and metrics")
        step("uploading report.md")
        time.sleep(30)

    start = time.monotonic()
    with pytest.raises(TargetUnavailable, match=r"^--mlflow URL: no complete answer within 0.5 s "
                                                r"\(--publish-timeout\) while uploading report.md;"):
        within("--mlflow URL", deadline, upload, doing="starting")
    assert time.monotonic() - start < 2
    # the deadline is shared: a later step finds no time left and says so without starting
    with pytest.raises(TargetUnavailable, match="before it started"):
        within("--pushgateway URL", deadline, lambda step: None, doing="pushing the metrics")


def test_errors_in_the_step_pass_through():
    def refuse(step):
        raise ConfigError("--mlflow URL: refused")

    with pytest.raises(ConfigError, match="refused"):
        within("--mlflow URL", Deadline(5), refuse, doing="starting")
    assert within("--mlflow URL", Deadline(5), lambda step: 42, doing="starting") == 42


def test_mlflow_uploads_nothing_from_outside_the_folder(ort_output, tmp_path):
    """A report.md (or a manifest-listed artefact file) that is a link out of the folder: refused before
    any run is created; the file it points to is never uploaded."""
    pytest.importorskip("mlflow", reason="--mlflow needs mlflow (pip install 'dlopt[mlflow]')")
    from mlflow.tracking import MlflowClient

    out, _ = ort_output
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh-key\n")
    copy = tmp_path / "colleague"
    shutil.copytree(out, copy)
    (copy / "report.md").unlink()
    (copy / "report.md").symlink_to(secret)
    store = tmp_path / "mlruns"
    result = CliRunner().invoke(package, [str(copy), "--mlflow", store.as_uri()], env={"MLFLOW_ALLOW_FILE_STORE": "true"})
    message = _one_line(result.exception)
    assert isinstance(result.exception, ConfigError)
    assert "'report.md' (uploaded by --mlflow), which goes through the symlink report.md" in message
    uploaded = [p for p in store.rglob("*") if p.is_file() and p.read_bytes() == b"ssh-key\n"] if store.exists() else []
    assert uploaded == []
    if store.exists():
        client = MlflowClient(tracking_uri=store.as_uri())
        experiment = client.get_experiment_by_name("dlopt")
        assert experiment is None or client.search_runs([experiment.experiment_id]) == []

    # the same for an artefact file the manifest lists
    (copy / "report.md").unlink()
    shutil.copy2(out / "report.md", copy / "report.md")
    model = copy / "model.onnx"
    model.unlink()
    model.symlink_to(secret)
    result = CliRunner().invoke(package, [str(copy), "--mlflow", store.as_uri()], env={"MLFLOW_ALLOW_FILE_STORE": "true"})
    assert isinstance(result.exception, DloptError) and "model.onnx" in str(result.exception), result.exception
    assert not [p for p in store.rglob("*") if p.is_file() and p.read_bytes() == b"ssh-key\n"]

    # and a name in the manifest that climbs out of the folder
    model.unlink()
    shutil.copy2(out / "model.onnx", model)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [*manifest["files"], "../secret.txt"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(package, [str(copy), "--mlflow", store.as_uri()], env={"MLFLOW_ALLOW_FILE_STORE": "true"})
    assert isinstance(result.exception, DloptError) and "../secret.txt" in str(result.exception), result.exception
    assert "\n" not in str(result.exception)
    assert not [p for p in store.rglob("*") if p.is_file() and p.read_bytes() == b"ssh-key\n"]
