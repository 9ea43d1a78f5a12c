"""MLflow runs of a compile and a gate, read back from a real local store with MlflowClient."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("mlflow", reason="MLflow tracking needs mlflow (pip install 'dlopt[mlflow]')")

from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.cli.gate import gate  # noqa: E402
from dlopt.cli.package import package  # noqa: E402
from dlopt.deploy.tracking import git_commit, log_run  # noqa: E402


@pytest.fixture(scope="module")
def compiled(ort_output):
    return ort_output


@pytest.fixture
def client(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens file stores only when asked
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # or MlflowClient's own lookups open ./mlflow.db (MLflow 3.18)
    return uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_compile_run_read_back(compiled, client, monkeypatch):
    out, report = compiled
    uri, mlflow = client
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the product's own call, as a user runs it
    from pathlib import Path

    default_store = Path.cwd() / "mlflow.db"  # MLflow's default store, resolved against this process's cwd
    existed = default_store.exists()
    result = CliRunner().invoke(package, [str(out), "--mlflow", uri, "--register", "cnn-cpu"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert default_store.exists() == existed  # registering in the named store opened no other store
    assert "registered cnn-cpu version 1" in result.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for this test's own client

    [experiment] = [e for e in mlflow.search_experiments() if e.name == "dlopt"]
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    data = run.data
    chosen = next(c for c in report["candidates"] if c["chosen"])
    key = f"{chosen['backend']}-{chosen['precision']}"
    assert data.params["target"] == "here" and data.params["chosen"] == report["chosen"]
    assert data.params["option.runs"] == "5" and data.params["version.onnxruntime"] == dlopt_version("onnxruntime")
    latency = chosen["measurement"]["latency"]
    assert data.metrics["latency_p50_ms"] == pytest.approx(latency["p50_ms"])
    assert data.metrics["latency_p99_ms"] == pytest.approx(latency["p99_ms"])
    assert data.metrics["speedup"] == pytest.approx(chosen["speedup"])
    assert data.metrics["accuracy_drop_pp"] == pytest.approx(chosen["score"]["drop_pp"])
    assert data.metrics["size_bytes"] == chosen["measurement"]["size_bytes"]
    assert data.metrics["energy_j"] == pytest.approx(chosen["measurement"]["energy"]["joules_per_inference"])
    assert data.metrics[f"{key}.latency_p50_ms"] == data.metrics["latency_p50_ms"]
    assert data.metrics["original.latency_p50_ms"] == pytest.approx(report["baseline"]["latency"]["p50_ms"])
    # every measured candidate is there, fp32 and int8
    assert {k.split(".")[0] for k in data.metrics} >= {"original", "ort-fp32", "ort-int8"}
    assert data.tags["dlopt.model_sha256"] == report["model"]["sha256"]
    assert data.tags["dlopt.kind"] == "compile"

    top = {f.path for f in mlflow.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "manifest.json", "artifact"} <= top
    manifest = json.loads((out / "manifest.json").read_text())
    shipped = {f.path for f in mlflow.list_artifacts(run.info.run_id, "artifact")}
    assert shipped == {f"artifact/{name}" for name in manifest["files"]}
    local = mlflow.download_artifacts(run.info.run_id, "report.json", str(out.parent / "dl"))
    assert json.loads(open(local).read())["model"]["sha256"] == report["model"]["sha256"]

    [version] = mlflow.search_model_versions("name='cnn-cpu'")
    assert (str(version.version), version.run_id) == ("1", run.info.run_id)
    assert version.source.endswith("/artifact")
    assert version.tags["dlopt.candidate"] == report["chosen"]
    # a second compile of the same model registers version 2
    again = log_run(report, out, tracking_uri=uri, register="cnn-cpu")
    assert again.model_version == "2"


def test_gate_run(compiled, client):
    out, report = compiled
    uri, mlflow = client
    result = CliRunner().invoke(gate, [str(out), "--max-accuracy-drop", "100", "--max-size-mb", "0.000001",
                                       "--mlflow", uri, "--register", "cnn-gated"])
    assert isinstance(result.exception, Exception) and result.exception.exit_code == 1  # the size gate fails
    assert mlflow.search_model_versions("name='cnn-gated'") == []  # what failed its gate is not registered
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("dlopt").experiment_id])
    assert run.info.status == "FINISHED"  # the run records the failure; it did not fail itself
    assert run.data.tags["dlopt.kind"] == "gate" and run.data.tags["dlopt.gate.passed"] == "false"
    assert run.data.tags["dlopt.gate.size"] == "failed"
    assert run.data.metrics["gate.size.measured"] == pytest.approx(
        next(c for c in report["candidates"] if c["chosen"])["measurement"]["size_bytes"] / 1e6)


def test_register_needs_mlflow(compiled):
    out, _ = compiled
    result = CliRunner().invoke(package, [str(out), "--register", "x", "--metrics-file", str(out.parent / "m.prom")])
    assert isinstance(result.exception, ConfigError) and "--register NAME needs --mlflow" in str(result.exception)
    assert not (out.parent / "m.prom").exists()


def test_git_commit_read_from_dot_git(tmp_path):
    """The commit tag comes from the .git of the folder holding the model (no git process is run)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / "project" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(commit + "\n")
    (tmp_path / "project" / "models").mkdir()
    assert git_commit(str(tmp_path / "project" / "models" / "cnn.onnx")) == commit
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{commit} refs/heads/main\n")
    assert git_commit(str(tmp_path / "project" / "models" / "cnn.onnx")) == commit


def dlopt_version(module: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(module)


def test_compile_then_gate_registers_nothing_when_the_gate_fails(tmp_path, client):
    """`compile --gate --mlflow --register` publishes after the gate, with its results: a failed gate
    logs its run but registers no version."""
    import models
    from cli import dlopt as run_cli

    uri, mlflow = client
    models.save(models.conv_bn_relu(batch="N"), tmp_path / "cnn.onnx")
    (tmp_path / "dlopt.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n\n'
                                         '[gate]\nmax-size-mb = 0.000001\n')
    done = run_cli("compile", "cnn.onnx", "--target", "here", "--precision", "fp32", "--runs", "20", "--samples", "4",
                   "-o", "out", "--gate", "--mlflow", uri, "--register", "cnn-compiled", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "not registering cnn-compiled: the gate failed" in done.stdout
    assert mlflow.search_model_versions("name='cnn-compiled'") == []
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("dlopt").experiment_id])
    assert run.data.tags["dlopt.gate.passed"] == "false" and run.data.tags["dlopt.gate.size"] == "failed"


def _sql_store_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("sqlalchemy", "alembic"))


@pytest.fixture
def plain_cwd(monkeypatch, tmp_path):
    """A folder of its own as the working directory, with no MLflow settings in the environment."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.skipif(not _sql_store_installed(), reason="MLflow's SQLite store needs sqlalchemy and alembic "
                                                       "(pip install 'dlopt[mlflow]')")
def test_default_store_is_the_sqlite_one_mlflow_reads(compiled, plain_cwd):
    """`--mlflow` with no URI writes ./mlflow.db, MLflow's own default store: MLflow reads it back with no
    URI and no MLFLOW_ALLOW_FILE_STORE (a ./mlruns file store is refused by MLflow 3 without it)."""
    import os

    import mlflow
    from mlflow.tracking import MlflowClient

    out, report = compiled
    result = CliRunner().invoke(package, [str(out), "--mlflow"])
    assert result.exit_code == 0, (result.output, result.exception)
    store = f"sqlite:///{plain_cwd / 'mlflow.db'}"
    assert f" in {store}" in result.output
    assert (plain_cwd / "mlflow.db").is_file()
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    assert mlflow.get_tracking_uri() == store  # the artefacts beside it do not turn MLflow to a file store

    client = MlflowClient()  # MLflow's default, as `mlflow ui` here would open it
    [run] = client.search_runs([client.get_experiment_by_name("dlopt").experiment_id])
    chosen = next(c for c in report["candidates"] if c["chosen"])
    assert run.info.status == "FINISHED" and run.data.params["chosen"] == report["chosen"]
    assert run.data.metrics["latency_p50_ms"] == pytest.approx(chosen["measurement"]["latency"]["p50_ms"])
    assert run.data.metrics["speedup"] == pytest.approx(chosen["speedup"])
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"report.json", "manifest.json", "artifact"}
    # a second run lands in the same store
    assert CliRunner().invoke(package, [str(out), "--mlflow"]).exit_code == 0
    assert len(client.search_runs([run.info.experiment_id])) == 2


@pytest.mark.skipif(_sql_store_installed(), reason="sqlalchemy and alembic are installed here")
def test_default_store_without_sqlalchemy_is_refused_first(compiled, plain_cwd):
    """Without sqlalchemy/alembic (mlflow-skinny alone) the default SQLite store cannot open: one line
    naming the install, before anything is done."""
    from dlopt.core.errors import TargetUnavailable

    out, _ = compiled
    prom = plain_cwd / "m.prom"
    result = CliRunner().invoke(package, [str(out), "--mlflow", "--metrics-file", str(prom)])
    assert isinstance(result.exception, TargetUnavailable), (result.output, result.exception)
    assert str(result.exception) == (
        f"--mlflow: MLflow's default store sqlite:///{plain_cwd / 'mlflow.db'} needs sqlalchemy and alembic: "
        f"pip install 'dlopt[mlflow]', or give --mlflow a server URL or a file: store")
    assert sorted(p.name for p in plain_cwd.iterdir()) == []  # nothing written, not even the metrics file


def test_explicit_file_store_still_works(compiled, plain_cwd, monkeypatch):
    """A path given to --mlflow is a file store, as before (dlopt lets MLflow open it for its own call)."""
    import os

    from mlflow.tracking import MlflowClient

    out, report = compiled
    result = CliRunner().invoke(package, [str(out), "--mlflow", "runs"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert f" in {(plain_cwd / 'runs').as_uri()}" in result.output
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and not (plain_cwd / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store is the user's opt-in
    client = MlflowClient(tracking_uri=(plain_cwd / "runs").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("dlopt").experiment_id])
    assert run.data.params["chosen"] == report["chosen"]
