"""``dlopt serve OUT``: a real Triton Inference Server for an output's artefact, run by ``dlopt.load`` inside it.

The server is the ``tritonserver`` binary the ``nvidia-pytriton`` wheel ships (Triton core with the
HTTP and gRPC KServe V2 endpoints, health and readiness, Prometheus metrics on its own port, the
dynamic batcher and the Python backend), started directly: PyTriton's Python layer is not used,
its NumPy-1 pin and tensor interface do not fit dlopt's NumPy 2.  The model in it is
``triton_python_model.py``: the artefact opened with ``dlopt.load``, so what the server answers is
what ``dlopt run`` computes.

Set-up the stub needs, done here: the interpreter's own ``libpython`` (a pyenv or python.org build
must be built with ``--enable-shared``; else the stub would load the system's and fail), the
wheel's libraries, and this environment's ``bin/`` first on PATH (the stub finds its packages
through the first ``python3`` there; it ignores PYTHONPATH).

Everything the server reads is written into a temporary folder (removed at exit): the model
repository (``config.pbtxt`` printed by protobuf from Triton's own ModelConfig message; the model
name checked; the output folder's path a quoted parameter) and the backend folder.  Endpoints
bind loopback unless ``host`` says otherwise.  SIGTERM and Ctrl-C drain: the server stops taking
new connections, finishes the requests it accepted, and exits; then ``serve`` returns 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from dlopt.core.artifacts import read_folder_json
from dlopt.core.errors import ConfigError, TargetUnavailable
from dlopt.deploy.triton import build_tensors, check_name, config_text, default_name, tuned_config
from dlopt.measure.runner import _specs
from dlopt.targets import read_artifact

logger = logging.getLogger(__name__)

TRITON_WHEEL = "nvidia-pytriton==0.7.0"
INSTALL = f"pip install --no-deps '{TRITON_WHEEL}'"  # its NumPy<2 pin is its Python layer's, which dlopt does not use
MODEL_FILE = Path(__file__).with_name("triton_python_model.py")
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30  # Triton's own wait for in-flight requests at shutdown
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"  # the process of each model instance: Triton's Python backend does not restart it
WATCH_S = 0.5  # how often serve() looks at the server and its model's processes


@dataclass(frozen=True)
class ServeOptions:
    name: str | None = None  # the Triton model name; default: the model file's stem, made safe
    max_batch_size: int | None = None  # None: 8 where the model has a symbolic batch axis, else 0 (no batching)
    max_queue_delay_us: int = 100
    instances: int = 1
    threads: int | None = None  # per instance; None: the artefact's own setting
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    ready_timeout: float = READY_TIMEOUT_S
    # report.json's serving.chosen (dlopt loadtest --tune) replaces batching, instances and threads when
    # max_batch_size is not given
    use_tuned: bool = True

    def check(self) -> "ServeOptions":
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"--host takes an IP address to bind (127.0.0.1, 0.0.0.0, ::1), not {self.host!r}") \
                from None
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(f"{flag} takes a port from 1 to 65535, got {port}")
        if len(set(ports.values())) < 3:
            raise ConfigError(f"the HTTP, gRPC and metrics ports must differ, got {sorted(ports.values())}")
        checks = (("--instances", self.instances, 1), ("--max-queue-delay-us", self.max_queue_delay_us, 0),
                  ("--threads", 1 if self.threads is None else self.threads, 1),
                  ("--max-batch-size", 0 if self.max_batch_size is None else self.max_batch_size, 0))
        for flag, value, low in checks:
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, got {value}")
        if self.name is not None:
            check_name(self.name)
        return self


@dataclass(frozen=True)
class TritonInstall:
    """The wheel's server, its libraries and the Python backend for this interpreter."""

    server: Path
    libs: Path
    backend: dict[str, Path]  # file name in <backend-directory>/python -> the wheel's file

    @classmethod
    def find(cls) -> "TritonInstall":
        """The wheel's files, found without importing pytriton; TargetUnavailable (one line) when one is missing."""
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TargetUnavailable(f"dlopt serve needs Triton's server from the nvidia-pytriton wheel: {INSTALL}")
        root = Path(spec.submodule_search_locations[0])
        dist = root / "tritonserver"
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        backend = {name: dist / "backends" / "python" / name for name in _BACKEND_FILES}
        backend["triton_python_backend_stub"] = stub
        server = dist / "bin" / "tritonserver"
        missing = [p for p in (server, *backend.values()) if not p.is_file()]
        if missing:
            what = "Python " + version if missing == [stub] else str(missing[0])
            raise TargetUnavailable(f"the nvidia-pytriton wheel at {root} has no {what} files; dlopt serve needs "
                                    f"{TRITON_WHEEL} and Python 3.9-3.12: {INSTALL}")
        if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
            raise TargetUnavailable(f"{sys.executable} was built without a shared libpython, which Triton's Python "
                                    f"backend loads; use a Python built with --enable-shared (Debian's python3, or "
                                    f"PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install) for dlopt's environment")
        return cls(server, root.parent / "nvidia_pytriton.libs", backend)

    def environment(self) -> dict[str, str]:
        """The server's environment: this interpreter's libpython and the wheel's libraries first, this
        environment's bin/ first on PATH (the stub's embedded Python finds its packages through it)."""
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
        env.pop("PYTHONHOME", None)
        return env


@dataclass(frozen=True)
class ServedModel:
    name: str
    key: str  # backend/precision
    config: object  # inference.ModelConfig


def write_repository(source: Path, repository: Path, options: ServeOptions) -> ServedModel:
    """``repository/NAME/config.pbtxt`` and ``NAME/1/model.py`` serving the artefact of ``source``."""
    artifact, root = read_artifact(source)
    report = read_folder_json(root, "report.json", missing_ok=True)
    report = report if isinstance(report, dict) else {}
    options = _with_tuned(options, report)
    name = check_name(options.name or default_name(report))
    inputs, outputs = _specs(artifact, root)
    config = build_tensors(inputs, outputs, name=name, max_batch_size=options.max_batch_size)
    config.backend = "python"
    if config.max_batch_size > 1:
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    else:
        config.ClearField("dynamic_batching")
    group = config.instance_group.add(count=options.instances)
    group.kind = type(group).Kind.Value("KIND_CPU")
    config.parameters["dlopt_output"].string_value = str(Path(artifact.folder).resolve())
    config.parameters["threads"].string_value = str(options.threads or 0)
    version = repository / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(MODEL_FILE, version / "model.py")
    (repository / name / "config.pbtxt").write_text(config_text(config))
    return ServedModel(name, f"{artifact.backend}/{artifact.precision}", config)


def _with_tuned(options: ServeOptions, report: dict) -> ServeOptions:
    """``options`` with report.json's tuned serving configuration, unless a batch size was asked for."""
    serving = report.get("serving")
    chosen = serving.get("chosen") if isinstance(serving, dict) else None
    if not options.use_tuned or options.max_batch_size is not None or chosen is None:
        return options
    tuned = tuned_config(chosen)
    threads = chosen.get("threads")
    threads = threads if isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= 1024 else None
    return replace(options, max_batch_size=tuned["max_batch_size"], max_queue_delay_us=tuned["max_queue_delay_us"],
                   instances=tuned["instances"], threads=options.threads or threads).check()


class TritonServer:
    """One ``tritonserver`` process over a repository; ``stop`` drains it."""

    def __init__(self, install: TritonInstall, repository: Path, workdir: Path, options: ServeOptions) -> None:
        self.install, self.options = install, options
        self.backends = workdir / "backends"
        (self.backends / "python").mkdir(parents=True)
        for name, path in install.backend.items():
            os.symlink(path, self.backends / "python" / name)
        self.shm_prefix = f"dlopt_serve_{os.getpid()}_"
        self.log_path = workdir / "tritonserver.log"
        o = options
        self.argv = [str(install.server), f"--model-repository={repository}", f"--backend-directory={self.backends}",
                     f"--http-address={o.host}", f"--http-port={o.http_port}",
                     f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
                     f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
                     "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
                     f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                     f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--log-verbose=0", "--strict-model-config=true"]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = self.options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.options.http_port}"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.install.environment(), start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def wait_ready(self, model: str, stopping: threading.Event) -> None:
        """Until the model answers ready; TargetUnavailable with the server's last log lines when it exits or
        the deadline passes first."""
        deadline = time.monotonic() + self.options.ready_timeout
        while time.monotonic() < deadline and not stopping.is_set():
            if self.process.poll() is not None:
                raise TargetUnavailable(f"tritonserver exited with status {self.process.returncode} before it was "
                                        f"ready: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/models/{model}/ready", timeout=1.0) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            stopping.wait(0.1)
        if not stopping.is_set():
            raise TargetUnavailable(f"tritonserver was not ready within {self.options.ready_timeout:.0f} s: "
                                    f"{self.log_tail()}")

    def backend_pids(self) -> frozenset[int]:
        """The Python-backend stub processes serving this server's model instances (children of tritonserver
        running the stub); empty where /proc cannot be read."""
        if self.process is None:
            return frozenset()
        found = set()
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and _parent(int(entry.name)) == self.process.pid:
                    with contextlib.suppress(OSError):
                        command = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")[0]
                        if command.endswith(STUB.encode()):
                            found.add(int(entry.name))
        return frozenset(found)

    def dead_backends(self, pids: frozenset[int]) -> list[int]:
        """Those of ``pids`` no longer running as this server's children (exited, a zombie, or the pid reused)."""
        return sorted(pid for pid in pids if _parent(pid, running=True) != self.process.pid)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if line[:1] in ("E", "F")] or text
        return " | ".join(line.strip()[:300] for line in errors[-lines:]) or "(empty log)"

    def stop(self) -> int | None:
        """Drain and stop: SIGINT (Triton refuses new connections, finishes what it accepted), then SIGKILL
        past its exit timeout.  The server's exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %d s; killed", EXIT_TIMEOUT_S + 10)
        with_children = process.poll() is None
        try:  # the Python-backend stubs are in its session: none may outlive it
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if with_children:
            process.wait()
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        return process.returncode


def _parent(pid: int, running: bool = False) -> int | None:
    """The parent pid of ``pid`` from /proc (None when it is gone, or with ``running`` a zombie)."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError, IndexError):
        return None
    return None if running and state in ("Z", "X", "x") else int(parent)


def _die_with_parent() -> None:
    """In the server's process before exec: SIGKILL when dlopt dies (even by SIGKILL), so none outlives it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports nothing listens on now (bound to port 0, then released)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def served(source: Path, options: ServeOptions, stopping: threading.Event,
           log: Callable[[str], None] | None = None) -> Iterator[tuple[TritonServer, ServedModel]]:
    """The artefact of ``source`` served (``options``' ports; see ``free_ports``) for the ``with`` block, then
    drained and gone, whatever happens; ``stopping`` set (a signal) cuts the wait for readiness short."""
    options = options.check()
    install = TritonInstall.find()
    with tempfile.TemporaryDirectory(prefix="dlopt-serve-") as tmp:
        model = write_repository(Path(source), Path(tmp) / "models", options)
        server = TritonServer(install, Path(tmp) / "models", Path(tmp), options)
        if log:
            log(f"starting tritonserver for {model.name} ({model.key})")
        server.start()
        try:
            server.wait_ready(model.name, stopping)
            yield server, model
        finally:
            server.stop()
            if log:
                log(f"stopped {model.name}: the requests it accepted were answered")


def serve(source: Path, options: ServeOptions, *, on_ready: Callable[[str], None] = print,
          log: Callable[[str], None] | None = None) -> int:
    """Serve the artefact of ``source`` until SIGTERM or SIGINT (or the server stops); 0 after a drain."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with served(source, options, stopping, log) as (server, model):
            if not stopping.is_set():
                o = options
                on_ready(f"serving {model.name} ({model.key}) at {server.url} (KServe V2 over HTTP; gRPC "
                         f"{o.host}:{o.grpc_port}; metrics http://{o.host}:{o.metrics_port}/metrics)")
            stubs = server.backend_pids()
            logger.debug("model %s runs in backend processes %s", model.name, sorted(stubs))
            while not stopping.is_set() and server.process.poll() is None:
                dead = server.dead_backends(stubs)
                if dead and not stopping.is_set():  # Triton keeps answering ready and fails every request to it
                    raise TargetUnavailable(f"the process running model {model.name} (Triton's Python-backend "
                                            f"stub, pid {dead[0]}) died; its requests would all fail, so the "
                                            f"server was stopped")
                stopping.wait(WATCH_S)
            if not stopping.is_set():
                raise TargetUnavailable(f"tritonserver stopped on its own (status {server.process.returncode}): "
                                        f"{server.log_tail()}")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
