"""RPC without an ARM board (issue 24 item 5): an x86 target measured through a loopback tracker.

The server is TVM's own ``python -m tvm.exec.rpc_server`` on this machine under key ``local``
(tests/rpc_servers.py); dlopt treats the target given with ``--rpc-tracker`` as that device,
so its TVM candidate is verified and timed there, and ``dlopt bench --rpc-tracker`` runs the
output's TVM library there too.
"""

from __future__ import annotations

import json
import shutil

import pytest

import models
from cli import dlopt
from rpc_servers import LOCAL_KEY, compile_remote, local_rpc_server, rpc_tracker_address  # noqa: F401 - fixtures

MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")
# An x86 box of the farm, as a team would name it: this machine's CPU, ONNX Runtime and TVM.
TARGETS = '[targets.x86-farm]\nbase = "cpu"\ndescription = "an x86 box behind the tracker"\nbackends = ["ort", "tvm"]\n'


@pytest.fixture(scope="module")
def remote_x86(local_rpc_server, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("remote-x86")
    (tmp / "targets.toml").write_text(TARGETS)
    tracker = local_rpc_server.device.tracker
    return (*compile_remote(tmp, MODEL, "x86-farm", tracker, LOCAL_KEY, "--targets-file", tmp / "targets.toml"),
            tracker)


def test_compile_of_an_x86_target_times_its_tvm_candidate_on_the_remote_server(remote_x86):
    out, report, tracker = remote_x86
    tvm = next(c for c in report["candidates"] if c["backend"] == "tvm")
    latency = tvm["measurement"]["latency"]
    assert tvm["status"] == "ok" and tvm["fidelity"]["max_rel_error"] < 1e-4
    assert latency["device_key"] == LOCAL_KEY and latency["measured_on"] == f"{LOCAL_KEY} via RPC tracker {tracker}"
    assert latency["runs"] == 20 and 0 < latency["ci_low_ms"] <= latency["p50_ms"] <= latency["ci_high_ms"]
    assert tvm["reason"].startswith(f"verified and timed on {LOCAL_KEY} via RPC tracker")
    ort = next(c for c in report["candidates"] if c["backend"] == "ort")
    assert ort["status"] == "ok" and ort["measurement"]["latency"] is None  # RPC times TVM libraries only
    # the device's candidates all ship, for `dlopt bench` there
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f"{manifest['backend']}/{manifest['precision']}", *manifest["bundle"]} == {"ort/fp32", "tvm/fp32"}


def test_bench_runs_the_x86_library_on_the_remote_server(remote_x86, tmp_path):
    out, _, tracker = remote_x86
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    done = dlopt("bench", copy, "--runs", "20", "--json", "-q", "--candidate", "tvm/fp32",
                 "--rpc-tracker", tracker, "--rpc-key", LOCAL_KEY, timeout=600)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["candidates"]
    assert row["ran_as"] == f"rpc {LOCAL_KEY}" and row["verified"] is True and row["rel_error"] < 1e-4
    assert row["latency"]["runs"] == 20 and row["latency"]["p50_ms"] > 0


def test_bench_rpc_flags_on_no_tvm_library_are_refused(remote_x86, tmp_path):
    out, _, tracker = remote_x86
    done = dlopt("bench", out, "--candidate", "ort/fp32", "--rpc-tracker", tracker, "--rpc-key", LOCAL_KEY)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"dlopt: error: --rpc-tracker runs TVM libraries on the device, and the candidates asked for in {out} "
        f"(ort/fp32) hold none; drop --rpc-tracker/--rpc-key, or run `dlopt bench` on the device itself"]
    assert not (out / "device_report.json").exists()


def test_a_target_without_tvm_is_refused_in_one_readable_line(tmp_path):
    model = models.save(MODEL, tmp_path / "m.onnx")
    done = dlopt("compile", model, "--target", "cortex-m7", "-o", tmp_path / "out", "--rpc-tracker", "127.0.0.1:9",
                 "--rpc-key", "board")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dlopt: error: --rpc-tracker measures TVM libraries on the device, and target cortex-m7 builds none (its "
        "backends: c); drop --rpc-tracker/--rpc-key or give a target with tvm among its backends"]
    assert not (tmp_path / "out").exists()
