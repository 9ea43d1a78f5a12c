"""TVM libraries on remote devices through TVM's RPC tracker (tvmc's ``--rpc-tracker``, Relax era).

A tracker (``python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190 --port-end 9191``) hands out
RPC servers by key; each device runs one (``python -m tvm.exec.rpc_server --tracker
HOST:9190 --key rpi5``, with ``pip install 'apache-tvm[rpc]'`` there).  dlopt builds
here, uploads ``model.so`` into the server's session folder, loads it there and runs
the Relax VM on the device's CPU; MetaSchedule's RPC runner measures tuning trials the
same way.  Several boards under one key share the work; the tracker queues requests
while all of them are busy.

A TVM RPC server runs whatever it is sent: use it on a trusted network only.

Nothing on the network can hang dlopt or fill its memory: each exchange with the tracker
must be complete within TALK_TIMEOUT_S (a deadline for the whole exchange, not for each
read) and its frames are at most FRAME_CAP; TVM's native client, which has no timeout,
reaches the server through a relay in a child process that holds the server to deadlines
(handshake, first answer, REPLY_TIMEOUT_S per call) and to PACKET_CAP.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlopt.core.errors import ConfigError, DataError, TargetUnavailable, first_line
from dlopt.core.remote import RemoteDevice
from dlopt.targets.tvm import import_tvm
from dlopt.targets.tvm import rpc_relay
from dlopt.targets.tvm.rpc_relay import (PACKET_CAP, PACKET_MIN_RATE, REPLY_TIMEOUT_S, TALK_TIMEOUT_S,  # noqa: F401
                                         _left, _recv_by, _why)

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0  # waiting for a free server, and for a session's first answer
FRAME_CAP = 1 << 20  # a tracker's JSON frame (a summary of hundreds of servers is tens of KB)
TRACKER_MAGIC = 0x2F271  # tvm.rpc.base

_BIG_CORES = 1  # TVM's ThreadGroup::AffinityMode kBig: the pool on the device's fastest cores
# --port-end one past --port: TVM binds in [port, port_end), default end 9199 (a port from 9199 up hangs)
_START_TRACKER = "python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port} --port-end {end}"
_START_SERVER = "python -m tvm.exec.rpc_server --tracker {tracker} --key {key}"


class TrackerCode:
    """tvm.rpc.base.TrackerCode: the tracker's message codes (here without importing TVM)."""

    SUCCESS, REQUEST, SUMMARY = 0, 4, 6


class _TrackerLink:
    """A connection to the tracker speaking its protocol (magic, then length-prefixed JSON frames).

    Every exchange has an overall deadline (not one per ``recv``: a tracker that drip-feeds a
    frame still runs out of time) and frames over FRAME_CAP are refused before being read."""

    def __init__(self, device: RemoteDevice, timeout: float) -> None:
        self.device = device
        deadline = time.monotonic() + min(timeout, TALK_TIMEOUT_S)
        try:
            self._sock = socket.create_connection((device.host, device.port), timeout=_left(deadline))
        except socket.gaierror as exc:
            raise TargetUnavailable(f"cannot resolve the RPC tracker host {device.host!r} ({exc.strerror}); "
                                    f"check --rpc-tracker") from exc
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or first_line(exc)
            raise TargetUnavailable(f"cannot reach the RPC tracker at {device.tracker} ({reason}); start one "
                                    f"with `{_START_TRACKER.format(port=device.port, end=device.port + 1)}` or check "
                                    f"--rpc-tracker") from exc
        try:
            self._sock.sendall(TRACKER_MAGIC.to_bytes(4, "little", signed=True))
            magic = int.from_bytes(_recv_by(self._sock, 4, lambda: deadline), "little", signed=True)
        except OSError as exc:
            self.close()
            raise TargetUnavailable(f"{device.tracker} does not answer as a TVM RPC tracker "
                                    f"({_why(exc, min(timeout, TALK_TIMEOUT_S))})") from exc
        if magic != TRACKER_MAGIC:
            self.close()
            raise TargetUnavailable(f"{device.tracker} is not a TVM RPC tracker (it answered another protocol)")

    def ask(self, message: list, timeout: float = TALK_TIMEOUT_S, *, silent: str | None = None):
        """The tracker's JSON answer to ``message`` within ``timeout`` seconds in all; ``silent``: the
        message of the TargetUnavailable raised when none came in time."""
        deadline = time.monotonic() + timeout
        where = f"the RPC tracker at {self.device.tracker}"
        try:
            data = json.dumps(message).encode()
            self._sock.settimeout(_left(deadline))
            self._sock.sendall(len(data).to_bytes(4, "little", signed=True) + data)
            size = int.from_bytes(_recv_by(self._sock, 4, lambda: deadline), "little", signed=True)
            if not 0 <= size <= FRAME_CAP:
                raise TargetUnavailable(f"{where} sent a frame of {size} bytes (dlopt reads at most {FRAME_CAP}); "
                                        f"is it a TVM RPC tracker?")
            return json.loads(_recv_by(self._sock, size, lambda: deadline).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TargetUnavailable(f"{where} answered something that is not JSON ({first_line(exc)}); "
                                    f"is it a TVM RPC tracker?") from exc
        except OSError as exc:
            if silent is not None and isinstance(exc, TimeoutError):
                raise TargetUnavailable(silent) from exc
            raise TargetUnavailable(f"{where} did not answer ({_why(exc, timeout)})") from exc

    def servers(self) -> dict[str, tuple[int, int]]:
        """key -> (servers registered, servers free now)."""
        reply = self.ask([TrackerCode.SUMMARY])
        try:
            code, summary = reply
            if code != TrackerCode.SUCCESS:
                raise TargetUnavailable(f"the RPC tracker at {self.device.tracker} refused its summary ({code!r:.40})")
            counts: dict[str, int] = {}
            for info in summary.get("server_info", []):
                key = str(info.get("key", "")).partition(":")[2]  # "server:<key>"
                counts[key] = counts.get(key, 0) + 1
            queues = summary.get("queue_info", {})
            return {key: (total, int(queues.get(key, {}).get("free", 0))) for key, total in sorted(counts.items())}
        except (TypeError, ValueError, AttributeError) as exc:
            raise TargetUnavailable(f"the RPC tracker at {self.device.tracker} answered a summary dlopt cannot read "
                                    f"({str(reply)[:60]!r}); is it a TVM RPC tracker?") from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "_TrackerLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _RelayProcess:
    port: int
    process: subprocess.Popen

    def reason(self) -> str | None:
        """Why the relay cut the connection, once it has ended; None while it runs."""
        return self.stop() if self.process.poll() is not None else None

    def stop(self) -> str | None:
        """End the relay; the reason it cut the connection, if it did."""
        try:
            out, _ = self.process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return out.decode(errors="replace").strip() or None


def _relay_process(host: str, port: int, *, handshake_by: float, answer_by: float) -> _RelayProcess:
    """A ``_Relay`` to ``host:port`` in a child process, listening on a loopback port of its own."""
    listen = socket.create_server(("127.0.0.1", 0))
    handshake_s = max(0.0, handshake_by - time.monotonic())
    with listen:
        process = subprocess.Popen(
            [sys.executable, "-P", rpc_relay.__file__, str(listen.fileno()), host, str(port), repr(handshake_by),
             repr(answer_by), repr(REPLY_TIMEOUT_S), repr(handshake_s)],
            pass_fds=[listen.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return _RelayProcess(listen.getsockname()[1], process)


def servers(device: RemoteDevice, *, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, tuple[int, int]]:
    """Every key the tracker knows: ``{key: (servers registered, servers free now)}``."""
    with _TrackerLink(device, timeout) as link:
        return link.servers()


def require(device: RemoteDevice, *, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """The number of servers registered under the device's key; a one-line TargetUnavailable when
    the tracker cannot be reached or knows no such server (a check before building anything)."""
    return _check_key(device, servers(device, timeout=timeout))


def _check_key(device: RemoteDevice, census: dict[str, tuple[int, int]]) -> int:
    """The number of servers under the device's key; TargetUnavailable naming the known keys if none."""
    total = census.get(device.key, (0, 0))[0]
    if total:
        return total
    known = ", ".join(f"{k} ({n} server{'s' * (n != 1)}, {free} free)" for k, (n, free) in census.items())
    start = _START_SERVER.format(tracker=device.tracker, key=device.key)
    raise TargetUnavailable(f"no RPC server with key {device.key!r} is registered with the tracker at "
                            f"{device.tracker} (it knows {known or 'no servers at all'}); start one on the "
                            f"device with `{start}`")


def connect(device: RemoteDevice, timeout: float = DEFAULT_TIMEOUT_S, *, session_timeout: float = 0.0):
    """An RPC session (``tvm.rpc.RPCSession``) on a free server with the device's key.

    Waits up to ``timeout`` seconds while every such server is busy.  The server ends the
    session after ``session_timeout`` seconds (0: when the client disconnects).
    """
    import_tvm()
    from tvm import rpc

    started = time.perf_counter()
    busy = f"stayed busy for {timeout:g} s; try again later or add devices"
    with _TrackerLink(device, timeout) as link:
        total = _check_key(device, link.servers())
        reply = link.ask([TrackerCode.REQUEST, device.key, "", 1], timeout,
                         silent=f"all {total} RPC server(s) with key {device.key!r} at {device.tracker} {busy}")
    try:
        code, (url, port, match_key) = reply
        if code != TrackerCode.SUCCESS:
            raise TargetUnavailable(f"the RPC tracker at {device.tracker} refused a server for {device.key!r} "
                                    f"({code!r:.40})")
        url, port, match_key = str(url), int(port), str(match_key)
    except (TypeError, ValueError) as exc:
        raise TargetUnavailable(f"the RPC tracker at {device.tracker} answered a server dlopt cannot read "
                                f"({str(reply)[:60]!r}); is it a TVM RPC tracker?") from exc
    now = time.monotonic()
    relay = _relay_process(url, port, handshake_by=now + min(timeout, TALK_TIMEOUT_S), answer_by=now + timeout)
    try:
        session = rpc.connect("127.0.0.1", relay.port, match_key, session_timeout)
    except Exception as exc:  # TVM raises its own errors from the native connect
        raise TargetUnavailable(f"the RPC server {device.key!r} at {url}:{port} (from the tracker at "
                                f"{device.tracker}) failed the session: {relay.stop() or first_line(exc)}") from exc
    session.dlopt_relay = relay  # it ends with the session's socket
    logger.debug("RPC session on %s at %s:%d in %.2f s", device, url, port, time.perf_counter() - started)
    return session


def ms_runner(device: RemoteDevice, *, number: int = 3, repeat: int = 1, timeout: float = DEFAULT_TIMEOUT_S,
              min_repeat_ms: int = 100, cache_flush: bool = False, max_workers: int | None = None):
    """A MetaSchedule ``RPCRunner`` measuring tuning trials on the device's servers.

    Each trial opens its own session (``timeout`` bounds reaching the tracker and the
    session), uploads the builder's artefact and times it with ``number`` runs per
    ``repeat`` (at least ``min_repeat_ms`` each).  The artefact must load on the device as
    it is: a ``.so`` linked for its CPU (a ``.tar`` of objects needs a compiler there).
    ``max_workers`` defaults to the number of servers under the key now.
    """
    import_tvm()
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    total = require(device, timeout=timeout)
    rpc_config = RPCConfig(tracker_host=device.host, tracker_port=device.port, tracker_key=device.key,
                           session_timeout_sec=max(1, math.ceil(timeout)))
    evaluator = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                enable_cpu_cache_flush=cache_flush)
    return RPCRunner(rpc_config, evaluator, max_workers=max_workers or total, f_alloc_argument=alloc_arguments)


def alloc_arguments(session, device, args_info, alloc_repeat):
    """MetaSchedule's argument allocation, filling with numpy data sent over the session where the
    server's runtime lacks ``tvm.contrib.random.random_fill_for_measure`` (PyPI's runtime-only
    aarch64 TVM has no such function); runs in the runner's worker processes."""
    import numpy as np
    import_tvm()
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    try:
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    except Exception:  # AttributeError or a TVM error naming the missing function
        fill = None
    if fill is None:
        rng = np.random.default_rng(0)

        def fill(tensor):
            shape, dtype = tuple(int(d) for d in tensor.shape), np.dtype(str(tensor.dtype))
            data = (rng.uniform(-1.0, 1.0, shape) if dtype.kind == "f" else rng.integers(0, 2, shape)).astype(dtype)
            tensor.copyfrom(data)
    return alloc_argument_common(fill, device, args_info, alloc_repeat)


class RemoteSession:
    """A TVM library loaded on a remote device: ``run`` as ``TvmSession`` does, ``time`` on the device.

    ``threads`` is the size of the device's TVM thread pool in effect (the build's
    ``threads`` setting unless given).  A context manager; ``close`` ends the session and
    the server deletes what was uploaded.
    """

    def __init__(self, device: RemoteDevice, library: Path, settings: dict, *, timeout: float = DEFAULT_TIMEOUT_S,
                 threads: int | None = None, session_timeout: float = 0.0) -> None:
        tvm = import_tvm()
        from tvm.runtime.vm import VirtualMachine

        library = Path(library)
        if not library.is_file():
            raise ConfigError(f"{library} does not exist; give the model.so of a TVM artefact")
        self.device = device
        self._inputs = settings["inputs"]
        self.input_names = [i["name"] for i in self._inputs]
        self._tensor = tvm.runtime.tensor
        self._rpc = connect(device, timeout, session_timeout=session_timeout)
        started = time.perf_counter()
        try:
            self._rpc.upload(str(library), library.name)
            self._dev = self._rpc.cpu()
            self._vm = VirtualMachine(self._rpc.load_module(library.name), self._dev)
            # VirtualMachine.get_outputs builds a self-referencing closure holding the VM (and so the
            # session) until the garbage collector runs; these two fetch the outputs without one.
            self._output_arity, self._output = self._vm.module["get_output_arity"], self._vm.module["get_output"]
            wanted = int(threads if threads is not None else settings.get("threads") or 0)
            if wanted:
                self._rpc.get_function("runtime.config_threadpool")(_BIG_CORES, wanted)
            self.threads = int(self._rpc.get_function("runtime.NumThreads")())
        except Exception as exc:  # TVM's remote errors carry the device's traceback
            traceback.clear_frames(exc.__traceback__)  # its frames hold the session open
            relay = getattr(self._rpc, "dlopt_relay", None)
            self.close()
            why = relay.reason() if relay is not None else None  # the relay cut it: a deadline or the size cap
            form = settings.get("form") or "TVM library"
            raise TargetUnavailable(f"the RPC server {device.key!r} could not load {library.name} ({form}): "
                                    f"{why or first_line(exc)}") from exc
        logger.debug("%s loaded on %s in %.2f s (%d threads)", library.name, device,
                     time.perf_counter() - started, self.threads)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs of ``main`` on the device; a batch on a batch-1 library runs sample by sample."""
        outputs = []
        for args in self._samples(feeds):
            self._vm.set_input("main", *args)  # the stateful API also returns tuples over RPC
            self._vm.invoke_stateful("main")
            outputs.append(self._fetch())
        if len(outputs) == 1:
            return outputs[0]
        return [np.concatenate(parts, axis=0) for parts in zip(*outputs)]

    def time_ms(self, feed: dict[str, np.ndarray], runs: int, warmup: int) -> np.ndarray:
        """Per-run latency of ``feed`` in milliseconds, measured on the device by TVM's time evaluator.

        Each sample is one run of ``main`` on inputs already on the device, outputs left
        there, so no network time is in the figures: what the device takes.  A batch on a
        batch-1 library times each sample's runs and adds them up per run.
        """
        if runs < 1 or warmup < 0:
            raise ConfigError(f"timing needs runs >= 1 and warmup >= 0, not runs={runs}, warmup={warmup}")
        per_run = np.zeros(runs)
        for i, args in enumerate(self._samples(feed)):
            name = f"dlopt_timed_{i}"
            self._vm.save_function("main", name, *args, include_return=False)
            if warmup:
                self._vm.time_evaluator(name, self._dev, number=warmup, repeat=1)()
            # number=1: every result is one run; the evaluator's own first call is discarded.
            result = self._vm.time_evaluator(name, self._dev, number=1, repeat=runs, min_repeat_ms=0)()
            per_run += np.asarray(result.results, dtype=np.float64) * 1e3
        return per_run

    def _fetch(self, *index: int) -> list[np.ndarray]:
        """The outputs of the last call, tuples flattened in order."""
        arity = int(self._output_arity("main", *index))
        if arity < 0:  # a tensor
            return [self._output("main", *index).numpy()]
        return [array for i in range(arity) for array in self._fetch(*index, i)]

    def _samples(self, feeds: dict[str, np.ndarray]) -> list[list]:
        """The device tensors of each call: one call, or one per sample of a batch on a batch-1 library."""
        if self._vm is None:
            raise ConfigError(f"the remote session on {self.device} is closed")
        for spec in self._inputs:
            if spec["name"] not in feeds:
                raise DataError(f"missing input {spec['name']!r}; the library takes {', '.join(self.input_names)}")
        from dlopt.targets.tvm.backend import arguments, per_call

        return [arguments(self._inputs, feed, lambda array: self._tensor(array, device=self._dev))
                for feed in per_call(self._inputs, feeds)]

    def close(self) -> None:
        # The session ends when the last remote handle goes; the server then removes its folder.
        self._vm = self._dev = self._rpc = self._output_arity = self._output = None

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remote_session(device: RemoteDevice, library: Path, settings: dict, **options) -> RemoteSession:
    """``RemoteSession(device, library, settings, **options)``: the library loaded on the device."""
    return RemoteSession(device, library, settings, **options)
