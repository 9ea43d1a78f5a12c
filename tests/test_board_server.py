"""The documented emulated board (docs/device-farm.md, issue 24 item 5): ``python -m dlopt.device.emulation
serve`` registers a TVM RPC server under qemu-aarch64 with a tracker, prints one ready line, serves
``dlopt compile``/``dlopt bench --rpc-tracker`` and stops on Ctrl-C with nothing left running."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

import models
from cli import dlopt
from dlopt.device.emulation import aarch64_python
from dlopt.core.remote import RemoteDevice
from dlopt.targets.tvm.rpc import servers
from rpc_servers import HOST, board_server_command, free_port, rpc_tracker

EMULATED = aarch64_python()
MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")
KEY = "rpi5"


def _ready_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            return proc.stdout.readline().strip()
    raise AssertionError(f"no ready line within {timeout:g} s (exit {proc.poll()}): {proc.stderr.read()[-800:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(isinstance(EMULATED, str), reason=f"the emulated board needs `make arm64-env`: {EMULATED}")
def test_the_documented_board_server_serves_compile_and_bench_and_stops_on_ctrl_c(tmp_path):
    model = models.save(MODEL, tmp_path / "m.onnx")
    with rpc_tracker(tmp_path) as tracker:
        port = free_port()
        proc = subprocess.Popen(board_server_command(tracker, KEY, port, "cortex-a76"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path)
        try:
            started = time.perf_counter()
            line = _ready_line(proc, 180)
            print(f"ready in {time.perf_counter() - started:.1f} s: {line}")
            assert line == (f"dlopt: emulated aarch64 board ready: key 'rpi5' with the RPC tracker at {tracker}, "
                            f"server on {HOST}:{port} under qemu-aarch64 emulation (cortex-a76); Ctrl-C stops it")
            assert servers(RemoteDevice.parse(tracker, KEY))[KEY] == (1, 1)
            rpc = ["--rpc-tracker", tracker, "--rpc-key", KEY]
            done = dlopt("compile", model, "--target", "rpi5", "-o", tmp_path / "out", "-q", "--runs", "20",
                         "--precision", "fp32", "--json", *rpc, timeout=600)
            assert done.returncode == 0, done.stderr
            tvm = next(c for c in json.loads(done.stdout)["candidates"] if c["backend"] == "tvm")
            assert tvm["status"] == "ok" and tvm["measurement"]["latency"]["device_key"] == KEY
            done = dlopt("bench", tmp_path / "out", "--candidate", "tvm/fp32", "--runs", "20", "--json", "-q", *rpc,
                         timeout=600)
            assert done.returncode == 0, done.stderr
            (row,) = json.loads(done.stdout)["candidates"]
            assert row["ran_as"] == f"rpc {KEY}" and row["verified"] is True and row["rel_error"] < 1e-4
            assert row["latency"]["runs"] == 20 and row["latency"]["p50_ms"] > 0
            print(f"compile: tvm/fp32 p50 {tvm['measurement']['latency']['p50_ms']:.3f} ms on {KEY}; bench: "
                  f"{row['ran_as']} p50 {row['latency']['p50_ms']:.3f} ms, rel error {row['rel_error']:.1e}")
            server = _processes_below(proc.pid)
            assert len(server) >= 2  # dlopt's and the emulated server's
            os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends
            assert proc.wait(30) == 0
            assert proc.stderr.read() == "" and proc.stdout.read() == ""  # one line in all, no traceback
            deadline = time.monotonic() + 10
            while any(_alive(pid) for pid in server) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not [pid for pid in server if _alive(pid)]
            assert servers(RemoteDevice.parse(tracker, KEY)).get(KEY) is None  # unregistered
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _processes_below(leader: int) -> list[int]:
    """``leader``, its children and everything in their process groups (the emulated server's sessions)."""
    stats = {}
    for name in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split() if name.isdigit() else None
        except OSError:
            continue
        if fields:
            stats[int(name)] = (int(fields[1]), int(fields[2]))  # ppid, pgid
    groups = {leader} | {pid for pid, (ppid, _) in stats.items() if ppid == leader}
    return [pid for pid, (_, pgid) in stats.items() if pgid in groups]


def test_without_the_emulation_environment_it_says_what_to_run(tmp_path):
    env = {**os.environ, "DLOPT_ARM64_ENV": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "dlopt.device.emulation", "serve", "--tracker", "127.0.0.1:9", "--key",
                           KEY], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("dlopt: error: no aarch64 emulation: missing ") and "run `make arm64-env`" in line


def test_a_bad_key_is_refused_before_anything_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dlopt.device.emulation", "serve", "--tracker", "127.0.0.1:9", "--key",
                           "rpi 5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dlopt: error: RPC key 'rpi 5' must be letters, digits, '.', '_', '+' or '-' (e.g. rpi5), as given to the "
        "device's rpc_server --key"]
