"""`dlopt tune --rpc-tracker`, `dlopt compile --rpc-tracker` and `dlopt bench --rpc-tracker`: TVM kernels tuned,
and TVM candidates verified and timed, on a device behind TVM's RPC tracker (here a qemu-aarch64 server on
loopback, started by the fixture)."""

from __future__ import annotations

import json
import shutil

import pytest

import models
from cli import dlopt
from rpc_servers import compile_remote, qemu_rpc_server, rpc_tracker_address  # noqa: F401 - fixtures
from serving import dlopt_here

MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")


@pytest.fixture(scope="module")
def remote_rpi5(qemu_rpc_server, tmp_path_factory):  # noqa: F811
    """The RPC round trip once for the module: `dlopt tune` builds here and measures its trials on the (emulated)
    board, then `dlopt compile` applies that database and verifies and times the tuned library on the board:
    (output folder, compile report, tracker, tune result, database root)."""
    folder = tmp_path_factory.mktemp("remote")
    tracker = qemu_rpc_server.device.tracker
    # 2 trials (rounds of one on this model's tasks): each is built here and measured on the board like 4 were
    done = dlopt("tune", models.save(MODEL, folder / "m.onnx"), "--target", "rpi5", "--trials", "2",
                 "--db", folder / "db", "--json", "--rpc-tracker", tracker, "--rpc-key", "qemu-aarch64", timeout=900)
    assert done.returncode == 0, done.stderr
    tuned = json.loads(done.stdout)
    # 3 random feeds compared on the board (the default 20 adds only emulated runs)
    out, report = compile_remote(folder, MODEL, "rpi5", tracker, "qemu-aarch64", "--tuning-db", folder / "db",
                                 "--samples", "3")
    return out, report, tracker, tuned, folder / "db"


def test_compile_times_the_tvm_candidate_on_the_remote_device(remote_rpi5):
    _, report, tracker, _, _ = remote_rpi5
    tvm = next(c for c in report["candidates"] if c["backend"] == "tvm")
    latency = tvm["measurement"]["latency"]
    assert tvm["status"] == "ok" and tvm["fidelity"]["max_rel_error"] < 1e-4
    assert latency["device_key"] == "qemu-aarch64" and tracker in latency["measured_on"]
    assert latency["runs"] == 20 and 0 < latency["ci_low_ms"] <= latency["p50_ms"] <= latency["ci_high_ms"]
    assert "verified and timed on qemu-aarch64" in tvm["reason"]
    ort = next(c for c in report["candidates"] if c["backend"] == "ort")
    assert ort["measurement"]["latency"] is None  # ORT is not run through TVM's RPC: still not measured there


def test_bench_runs_the_tvm_library_through_the_tracker(remote_rpi5, tmp_path):
    out, _, tracker, _, _ = remote_rpi5
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    done = dlopt("bench", copy, "--runs", "20", "--json", "-q", "--candidate", "tvm/fp32",
                 "--rpc-tracker", tracker, "--rpc-key", "qemu-aarch64", timeout=600)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["candidates"]
    assert row["ran_as"] == "rpc qemu-aarch64" and row["verified"] is True and row["rel_error"] < 1e-4
    assert row["latency"]["runs"] == 20 and row["latency"]["p50_ms"] > 0
    assert "emulated, not a device figure" not in (copy / "report.md").read_text()


def test_a_key_nobody_serves_fails_before_any_build(rpc_tracker_address, tmp_path):  # noqa: F811
    # in this process (the console script's start-up is not the subject): the same command and exit mapping
    model = models.save(MODEL, tmp_path / "m.onnx")
    code, err = dlopt_here("compile", model, "--target", "rpi5", "-o", tmp_path / "out",
                           "--rpc-tracker", rpc_tracker_address, "--rpc-key", "no-such-board")
    assert code == 2 and "no RPC server with key 'no-such-board'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_rpc_flags_go_together(tmp_path):
    model = models.save(MODEL, tmp_path / "m.onnx")
    code, err = dlopt_here("compile", model, "--target", "rpi5", "-o", tmp_path / "out", "--rpc-key", "rpi5")
    assert code == 2 and "--rpc-tracker and --rpc-key go together" in err


def test_tune_through_the_tracker_then_compile_applies_it_and_times_there(remote_rpi5):
    """The RPC round trip (the module's fixture): trials built here and measured on the board, then a compile
    that applies the database and times the tuned library on the board."""
    _, report, _, tuned, db = remote_rpi5
    assert tuned["trials_in_db"] >= 2 and tuned["tuned_tasks"] >= 1
    assert json.loads(next(db.glob("*/*/meta.json")).read_text())["target"]["mcpu"] == "cortex-a76"
    tvm = next(c for c in report["candidates"] if c["backend"] == "tvm")
    assert tvm["tuning"]["tuned_tasks"] == tuned["tuned_tasks"]
    assert tvm["fidelity"]["max_rel_error"] < 1e-4, tvm["reason"]
    latency = tvm["measurement"]["latency"]
    assert latency is not None and latency["device_key"] == "qemu-aarch64" and latency["runs"] == 20, tvm["reason"]
