"""A TVM RPC tracker and servers on loopback for tests: real TVM processes on free ports, always stopped.

``rpc_tracker(folder)`` and ``rpc_server(tracker, key, folder, emulated=...)`` are context
managers; the fixtures ``rpc_tracker_device`` (module scope) and ``local_rpc_server`` /
``qemu_rpc_server`` build on them and give the ``RemoteDevice`` to use.  Each process
runs in its own process group with TMPDIR in the test's folder, and the whole group is
ended on exit (also when the test fails), so nothing is left running or lying in /tmp.

The x86 server is TVM's own ``python -m tvm.exec.rpc_server``; the aarch64 one is the documented
emulated board, ``python -m dlopt.device.emulation serve`` (TVM's server loop in-process under
qemu-aarch64: ``tvm.exec.rpc_server`` starts its worker by executing ``sys.executable``, which
qemu-user cannot do without binfmt_misc).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dlopt.device.emulation import aarch64_python, qemu_cpu_models
from dlopt.core.errors import TargetUnavailable
from dlopt.core.profiles import resolve_target
from dlopt.core.remote import RemoteDevice
from dlopt.targets.tvm.rpc import servers

HOST = "127.0.0.1"
LOCAL_KEY, QEMU_KEY = "local", "qemu-aarch64"

@dataclass(frozen=True)
class Started:
    """A server registered with the tracker: the device to ask for, and how long it took to start."""

    device: RemoteDevice
    startup_s: float
    log: Path


def board_server_command(tracker: str, key: str, port: int, cpu: str | None = None) -> list[str]:
    """The documented emulated board (docs/device-farm.md): ``python -m dlopt.device.emulation serve``."""
    return [sys.executable, "-m", "dlopt.device.emulation", "serve", "--tracker", tracker, "--key", key, "--host", HOST,
            "--port", str(port), *(["--cpu", cpu] if cpu else [])]


def compile_remote(folder: Path, model, target: str, tracker: str, key: str, *extra) -> tuple[Path, dict]:
    """``dlopt compile`` of ``model`` (a ModelProto) at fp32 with 20 timed runs, its TVM candidate measured on
    the server registered under ``key``: (output folder, report)."""
    import models
    from cli import dlopt

    done = dlopt("compile", models.save(model, folder / "m.onnx"), "--target", target, *extra, "-o", folder / "out",
                 "-q", "--runs", "20", "--precision", "fp32", "--rpc-tracker", tracker, "--rpc-key", key, "--json",
                 timeout=600)
    assert done.returncode == 0, done.stderr
    return folder / "out", json.loads(done.stdout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _process(command: list[str], log: Path, env: dict[str, str] | None = None):
    """Popen in a new process group, output to ``log``; the group is terminated, then killed, on exit."""
    folder = log.parent / f"{log.stem}-tmp"
    folder.mkdir(exist_ok=True)
    env = {**(env if env is not None else os.environ), "TMPDIR": str(folder)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                start_new_session=True)
    try:
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the group we created: the server's workers and sessions too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace").strip()[-1500:] if log.exists() else "(no output)"


@contextlib.contextmanager
def rpc_tracker(folder: Path, *, timeout: float = 60.0):
    """``python -m tvm.exec.rpc_tracker`` on a free loopback port; yields ``HOST:PORT``."""
    for attempt in range(3):  # another process may take the probed port before the tracker binds it
        port = free_port()
        log = folder / f"tracker-{port}.log"
        with _process([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
                       "--port-end", str(port + 1)], log) as proc:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    servers(RemoteDevice(HOST, port, "probe"), timeout=2)
                except TargetUnavailable:
                    time.sleep(0.1)
                    continue
                yield f"{HOST}:{port}"
                return
            if proc.poll() is None:
                raise RuntimeError(f"the RPC tracker did not answer within {timeout:g} s: {_tail(log)}")
        if attempt == 2:
            raise RuntimeError(f"the RPC tracker did not start: {_tail(log)}")


@contextlib.contextmanager
def rpc_server(tracker: str, key: str, folder: Path, *, emulated: bool = False, cpu: str | None = None,
               timeout: float = 120.0):
    """An RPC server registered with ``tracker`` under ``key``; yields ``Started`` once it is free.

    ``emulated``: the aarch64 server under qemu-aarch64 (``dlopt.device.emulation``), emulating
    ``cpu`` (qemu's model name; default ``max``, every extension); skips the test with the
    reason when that environment is missing.
    """
    port = free_port()
    log = folder / f"server-{key}-{port}.log"
    started = time.perf_counter()
    env = None
    if emulated:
        python = aarch64_python()
        if isinstance(python, str):
            pytest.skip(python)
        command = board_server_command(tracker, key, port, cpu)
    else:
        command = [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", tracker, "--key", key,
                   "--host", HOST, "--port", str(port), "--port-end", str(port + 100)]
    device = RemoteDevice.parse(tracker, key)
    with _process(command, log, env) as proc:
        deadline = time.monotonic() + timeout
        while servers(device, timeout=10).get(key, (0, 0))[1] < 1:
            if proc.poll() is not None:
                raise RuntimeError(f"the {key} RPC server exited with {proc.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {key} RPC server did not register within {timeout:g} s: {_tail(log)}")
            time.sleep(0.2)
        yield Started(device, time.perf_counter() - started, log)


@pytest.fixture(scope="module")
def rpc_tracker_address(tmp_path_factory):
    """``HOST:PORT`` of a tracker shared by the module's tests."""
    with rpc_tracker(tmp_path_factory.mktemp("rpc-tracker")) as address:
        yield address


@pytest.fixture(scope="module")
def local_rpc_server(rpc_tracker_address, tmp_path_factory):
    """An x86 server (this machine's TVM) under key ``local``."""
    with rpc_server(rpc_tracker_address, LOCAL_KEY, tmp_path_factory.mktemp("rpc-local")) as started:
        yield started


@pytest.fixture(scope="module")
def qemu_rpc_server(rpc_tracker_address, tmp_path_factory):
    """An aarch64 server under qemu-aarch64 (the arm64 environment's TVM runtime) under key ``qemu-aarch64``,
    emulating the rpi5 profile's Cortex-A76 where qemu knows it."""
    cpu = resolve_target("rpi5").mcpu
    cpu = cpu if cpu in qemu_cpu_models() else None
    with rpc_server(rpc_tracker_address, QEMU_KEY, tmp_path_factory.mktemp("rpc-qemu"), emulated=True,
                    cpu=cpu) as started:
        yield started


# -- servers that misbehave on purpose (issue 23): threads on loopback, each stopped on exit ----------------

TRACKER_MAGIC, RPC_CODE_SUCCESS = 0x2F271, 0xFF271
HOSTILE = ("drip-feed", "never-answer", "garbage", "huge-frame")  # what both surfaces do wrong
TRACKER_ONLY = ("not-a-dict", "silent-after-magic")
HUGE = (1 << 31) - 1  # a 2 GiB frame announced, then zeros as fast as they are read


def _i32(value: int) -> bytes:
    return value.to_bytes(4, "little", signed=True)


def _frame(value) -> bytes:
    data = json.dumps(value).encode()
    return _i32(len(data)) + data


def _read_frame(conn: socket.socket) -> list:
    size = int.from_bytes(_read(conn, 4), "little", signed=True)
    return json.loads(_read(conn, size))


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _drip(conn: socket.socket, data: bytes, stop: threading.Event, every_s: float = 0.5) -> None:
    """``data`` one byte every ``every_s`` seconds: each recv gets something well within any per-recv timeout."""
    for byte in data:
        if stop.wait(every_s):
            return
        conn.sendall(bytes([byte]))
    stop.wait()


def _flood(conn: socket.socket, stop: threading.Event) -> None:
    zeros = bytes(1 << 16)
    while not stop.is_set():
        conn.sendall(zeros)


class Hostile:
    """A TCP server on a free loopback port that misbehaves as ``behaviour`` says, one thread per
    connection; ``connections`` counts the connections it accepted.  A context manager."""

    def __init__(self, handle) -> None:
        self._handle, self.connections = handle, 0
        self._stop = threading.Event()
        self._listen = socket.create_server((HOST, 0))
        self.port = self._listen.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listen.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._handle(conn, self._stop)

    def __enter__(self) -> "Hostile":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._listen.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def hostile_tracker(behaviour: str) -> Hostile:
    """An RPC tracker that answers the magic and then misbehaves when asked for its summary."""
    def handle(conn, stop):
        _read(conn, 4)
        if behaviour == "never-answer":
            return stop.wait()
        conn.sendall(_i32(TRACKER_MAGIC))
        _read_frame(conn)
        if behaviour == "drip-feed":
            _drip(conn, _frame([0, {"server_info": [], "queue_info": {}, "pad": "x" * 200}]), stop)
        elif behaviour == "garbage":
            conn.sendall(_i32(16) + bytes(range(0xF0, 0x100)))
        elif behaviour == "not-a-dict":
            conn.sendall(_frame([0, [1, 2, 3]]))
        # "silent-after-magic": a tracker that answered the magic and then says nothing
        elif behaviour == "huge-frame":
            conn.sendall(_i32(HUGE))
            _flood(conn, stop)
        stop.wait()
    return Hostile(handle)


def faithful_tracker(key: str, server_port: int) -> Hostile:
    """A tracker that works and hands out one server: the (hostile) RPC server at ``server_port``."""
    def handle(conn, stop):
        _read(conn, 4)
        conn.sendall(_i32(TRACKER_MAGIC))
        while not stop.is_set():
            code = _read_frame(conn)[0]
            if code == 6:  # SUMMARY
                conn.sendall(_frame([0, {"server_info": [{"key": f"server:{key}", "addr": [HOST, server_port]}],
                                         "queue_info": {key: {"free": 1, "pending": []}}}]))
            elif code == 4:  # REQUEST
                conn.sendall(_frame([0, [HOST, server_port, f"{key}:0.5"]]))
            else:
                conn.sendall(_frame(-1))
    return Hostile(handle)


def hostile_rpc_server(behaviour: str) -> Hostile:
    """An RPC server that reads the client's handshake and then misbehaves."""
    def handle(conn, stop):
        _read(conn, 4)
        _read(conn, int.from_bytes(_read(conn, 4), "little", signed=True))
        key = b"server:hostile"
        if behaviour == "never-answer":
            stop.wait()
        elif behaviour == "drip-feed":
            _drip(conn, _i32(RPC_CODE_SUCCESS) + _i32(len(key)) + key + bytes(64), stop)
        elif behaviour == "garbage":
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(range(256)))
            stop.wait()
        elif behaviour == "huge-frame":
            conn.sendall(_i32(RPC_CODE_SUCCESS) + _i32(len(key)) + key + (HUGE * 1).to_bytes(8, "little"))
            _flood(conn, stop)
    return Hostile(handle)


@contextlib.contextmanager
def hostile(surface: str, behaviour: str):
    """The ``--rpc-tracker`` address (HOST:PORT) of a misbehaving ``surface`` ("tracker" or "server":
    a working tracker handing out a misbehaving server, key ``hostile``)."""
    if surface == "tracker":
        with hostile_tracker(behaviour) as tracker:
            yield f"{HOST}:{tracker.port}"
        return
    with hostile_rpc_server(behaviour) as server, faithful_tracker("hostile", server.port) as tracker:
        yield f"{HOST}:{tracker.port}"
