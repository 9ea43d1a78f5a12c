"""TVM libraries on remote devices through TVM's RPC tracker (tvmc's ``--rpc-tracker``, Relax era).

A tracker (``python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190``) hands out
RPC servers by key; each device runs one (``python -m tvm.exec.rpc_server --tracker
HOST:9190 --key rpi5``, with ``pip install 'apache-tvm[rpc]'`` there).  dlopt builds
here, uploads ``model.so`` into the server's session folder, loads it there and runs
the Relax VM on the device's CPU; MetaSchedule's RPC runner measures tuning trials the
same way.  Several boards under one key share the work; the tracker queues requests
while all of them are busy.

A TVM RPC server runs whatever it is sent: use it on a trusted network only.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlopt.errors import ConfigError, DataError, TargetUnavailable, first_line
from dlopt.timing import Timing

logger = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 60.0
_BIG_CORES = 1  # TVM's ThreadGroup::AffinityMode kBig: the pool on the device's fastest cores
_KEY = re.compile(r"[A-Za-z0-9._+-]+")  # the tracker splits keys on ':' and the handshake on spaces
_START_TRACKER = "python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}"
_START_SERVER = "python -m tvm.exec.rpc_server --tracker {tracker} --key {key}"


@dataclass(frozen=True)
class RemoteDevice:
    """The devices registered under ``key`` with the RPC tracker at ``host:port``."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, tracker: str, key: str) -> "RemoteDevice":
        """From ``--rpc-tracker HOST:PORT`` (``[::1]:9190`` for IPv6) and ``--rpc-key KEY``."""
        text = tracker.strip()
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port:
            raise ConfigError(f"RPC tracker {tracker!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
        if ":" in host and not text.startswith("["):
            raise ConfigError(f"RPC tracker {tracker!r}: write an IPv6 address in brackets ([::1]:9190)")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"RPC tracker {tracker!r}: port {port!r} is not a number from 1 to 65535")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"RPC key {key!r} must be letters, digits, '.', '_', '+' or '-' (e.g. rpi5), "
                              f"as given to the device's rpc_server --key")
        return cls(host, int(port), key)

    @property
    def tracker(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.key} via RPC tracker {self.tracker}"


class _TrackerLink:
    """A connection to the tracker speaking its protocol (magic, then JSON frames), with a timeout."""

    def __init__(self, device: RemoteDevice, timeout: float) -> None:
        self.device = device
        try:
            self._sock = socket.create_connection((device.host, device.port), timeout=timeout)
        except socket.gaierror as exc:
            raise TargetUnavailable(f"cannot resolve the RPC tracker host {device.host!r} ({exc.strerror}); "
                                    f"check --rpc-tracker") from exc
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or first_line(exc)
            raise TargetUnavailable(f"cannot reach the RPC tracker at {device.tracker} ({reason}); start one "
                                    f"with `{_START_TRACKER.format(port=device.port)}` or check "
                                    f"--rpc-tracker") from exc
        from tvm.rpc import base

        self._base = base
        try:
            self._sock.sendall(base.RPC_TRACKER_MAGIC.to_bytes(4, "little", signed=True))
            magic = int.from_bytes(base.recvall(self._sock, 4), "little", signed=True)
        except OSError as exc:
            self.close()
            raise TargetUnavailable(f"{device.tracker} does not answer as a TVM RPC tracker "
                                    f"({first_line(exc)})") from exc
        if magic != base.RPC_TRACKER_MAGIC:
            self.close()
            raise TargetUnavailable(f"{device.tracker} is not a TVM RPC tracker (it answered another protocol)")

    def ask(self, message: list):
        self._base.sendjson(self._sock, message)
        return self._base.recvjson(self._sock)

    def servers(self) -> dict[str, tuple[int, int]]:
        """key -> (servers registered, servers free now)."""
        code, summary = self.ask([self._base.TrackerCode.SUMMARY])
        if code != self._base.TrackerCode.SUCCESS:
            raise TargetUnavailable(f"the RPC tracker at {self.device.tracker} refused its summary ({code})")
        counts: dict[str, int] = {}
        for info in summary.get("server_info", []):
            key = str(info.get("key", "")).partition(":")[2]  # "server:<key>"
            counts[key] = counts.get(key, 0) + 1
        queues = summary.get("queue_info", {})
        return {key: (total, int(queues.get(key, {}).get("free", 0))) for key, total in sorted(counts.items())}

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "_TrackerLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    from tvm import rpc
    from tvm.rpc.base import TrackerCode

    started = time.perf_counter()
    with _TrackerLink(device, timeout) as link:
        total = _check_key(device, link.servers())
        try:
            code, value = link.ask([TrackerCode.REQUEST, device.key, "", 1])
        except TimeoutError as exc:
            raise TargetUnavailable(f"all {total} RPC server(s) with key {device.key!r} at {device.tracker} "
                                    f"stayed busy for {timeout:g} s; try again later or add devices") from exc
        except OSError as exc:
            raise TargetUnavailable(f"the RPC tracker at {device.tracker} dropped the request for "
                                    f"{device.key!r} ({first_line(exc)})") from exc
    if code != TrackerCode.SUCCESS:
        raise TargetUnavailable(f"the RPC tracker at {device.tracker} refused a server for {device.key!r} ({code})")
    url, port, match_key = value
    try:
        session = rpc.connect(url, port, match_key, session_timeout)
    except Exception as exc:  # TVM raises its own errors from the native connect
        raise TargetUnavailable(f"the RPC server {device.key!r} at {url}:{port} (from the tracker at "
                                f"{device.tracker}) refused the session: {first_line(exc)}") from exc
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
        import tvm
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
            self.close()
            form = settings.get("form") or "TVM library"
            raise TargetUnavailable(f"the RPC server {device.key!r} could not load {library.name} ({form}): "
                                    f"{first_line(exc)}") from exc
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

    def time(self, feed: dict[str, np.ndarray], runs: int, warmup: int) -> Timing:
        """Per-run latency of ``feed`` measured on the device by TVM's time evaluator.

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
        block = max(1, min(10, runs // 10))  # the rounds dlopt.timing.time_interleaved would time
        rounds = [per_run[i:i + block] for i in range(0, runs, block)]
        return Timing.from_samples(per_run, rounds, warmup=warmup, threads=self.threads)

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
        from dlopt.targets.tvm import arguments, per_call

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
