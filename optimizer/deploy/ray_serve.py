"""``dlopt serve OUT --ray [ADDRESS]``: the artefact as a Ray Serve deployment, past one machine.

The same runner as in Triton (``dlopt.load`` on the output folder) runs in each replica
(``ray_serve_replica.ModelReplica``), with request batching (Ray Serve's ``serve.batch``) and a fixed
number of replicas or Ray Serve's autoscaling between two bounds.  Ray Serve's HTTP proxy on
``host:http_port`` answers KServe V2 (``kserve_v2``) for tritonclient's HTTP client, so ``dlopt
loadtest`` drives it as it drives Triton; ``GET /v2/models/NAME/stats`` gives Triton's statistics
fields (requests, samples, model runs and the batch sizes formed) summed over the replicas.

Without ADDRESS a local Ray is started on loopback only (each replica's inter-deployment gRPC
server too, which Ray itself binds to every interface) and shut down at the end; an ADDRESS
(``ray://head:10001``, ``head:6379``) joins a running cluster within ``ready_timeout`` seconds; the
output folder must then be readable at the same path on the nodes the replicas land on.  SIGTERM and Ctrl-C
drain: the application is deleted (each replica answers the requests it accepted before it stops),
then Serve and a local Ray are shut down, and ``serve_on_ray`` returns 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dlopt.core.artifacts import read_folder_json
from dlopt.core.errors import ConfigError, TargetUnavailable, first_line
from dlopt.core.optional import require
from dlopt.core.ray_local import LOOPBACK_ENV, ray_on_loopback
from dlopt.core.scoped_env import environ
from dlopt.deploy.ray_serve_replica import ModelReplica, Stats
from dlopt.deploy.triton import check_name, default_name
from dlopt.measure.runner import _specs
from dlopt.targets import read_artifact

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DRAIN_TIMEOUT_S = 30.0  # each replica's wait for the requests it accepted
_AUTOSCALE = re.compile(r"(\d+)-(\d+)")


@dataclass(frozen=True)
class RayServeOptions:
    name: str | None = None
    max_batch_size: int | None = None  # samples per model run; None: 8 with a symbolic batch axis, else 0
    max_queue_delay_us: int = 100
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Ray Serve's autoscaling_config
    threads: int | None = None  # per replica; None: the artefact's own setting
    host: str = "127.0.0.1"
    http_port: int = 8000
    address: str | None = None  # None: a local Ray on loopback
    ready_timeout: float = 120.0

    def check(self) -> "RayServeOptions":
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"--host takes an IP address to bind (127.0.0.1, 0.0.0.0, ::1), not {self.host!r}") \
                from None
        if not 1 <= self.http_port <= 65535:
            raise ConfigError(f"--http-port takes a port from 1 to 65535, got {self.http_port}")
        checks = (("--replicas", self.replicas, 1), ("--max-queue-delay-us", self.max_queue_delay_us, 0),
                  ("--threads", 1 if self.threads is None else self.threads, 1),
                  ("--max-batch-size", 0 if self.max_batch_size is None else self.max_batch_size, 0))
        for flag, value, low in checks:
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, got {value}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ConfigError(f"--autoscale MIN-MAX needs 1 <= MIN <= MAX, got {self.autoscale[0]}-{self.autoscale[1]}")
        if self.name is not None:
            check_name(self.name)
        return self

    @property
    def replica_text(self) -> str:
        if self.autoscale:
            return f"{self.autoscale[0]}-{self.autoscale[1]} replicas, autoscaling"
        return f"{self.replicas} replica{'s' if self.replicas != 1 else ''}"


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"1-4"`` -> (1, 4); ConfigError in one line otherwise."""
    match = _AUTOSCALE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"--autoscale takes MIN-MAX replicas (e.g. 1-4), not {text!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class Model:
    source: Path
    name: str
    key: str
    max_batch_size: int


def resolve_model(source: Path, options: RayServeOptions) -> Model:
    """The artefact to serve, its name and the batch size the replicas form; ConfigError before Ray starts."""
    artifact, root = read_artifact(source)
    report = read_folder_json(root, "report.json", missing_ok=True)
    name = check_name(options.name or default_name(report if isinstance(report, dict) else {}))
    inputs, outputs = _specs(artifact, root)
    specs = (*inputs, *outputs)
    batched = bool(inputs) and all(s.shape and not isinstance(s.shape[0], int) for s in specs)
    size = options.max_batch_size
    if size is None:
        size = DEFAULT_MAX_BATCH if batched else 0
    elif size > 0 and not batched:
        fixed = [s.name for s in specs if not s.shape or isinstance(s.shape[0], int)]
        raise ConfigError(f"--max-batch-size {size}: the model has no symbolic batch axis "
                          f"({', '.join(fixed[:4])} have a fixed first dimension); use --max-batch-size 0")
    return Model(Path(source).resolve(), name, f"{artifact.backend}/{artifact.precision}", size)


def _within(seconds: float, call: Callable[[], object], what: str) -> object:
    """``call()`` on a thread, given up after ``seconds`` (Ray's connect has no deadline of its own)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="dlopt-ray-connect")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TargetUnavailable(f"--ray: {what} took more than {seconds:.0f} s; check the address and `ray status`")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def start_ray(ray, options: RayServeOptions) -> bool:
    """Connect to ``options.address`` (within its deadline) or start a local Ray; True when this call started
    it.  Joining a cluster is given ``ready_timeout`` seconds.  Inside ``ray_on_loopback_for()``."""
    if ray.is_initialized():
        return False
    address = options.address
    for name in ("ray", "ray.serve"):  # Ray's notices stay out of the CLI's one-line output
        logging.getLogger(name).addHandler(logging.NullHandler())
    if not logger.isEnabledFor(logging.INFO):  # dlopt -v shows Ray's notices and Serve's progress
        logging.getLogger("ray").setLevel(logging.ERROR)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    cpus = None if address else max(os.cpu_count() or 1, options.autoscale[1] if options.autoscale
                                    else options.replicas)  # each replica holds one Ray CPU

    def init():
        with environ(**({"RAY_BACKEND_LOG_LEVEL": "error"} if address else {})):  # its retries, not on stderr
            ray.init(address=address or None, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, **({} if address else {"_node_ip_address": "127.0.0.1"}))

    try:
        if address:  # Ray's own connect has no overall deadline
            _within(options.ready_timeout, init, f"reaching Ray at {address}")
        else:
            init()
    except TargetUnavailable:
        raise
    except ValueError as exc:
        raise ConfigError(f"--ray {address or ''}: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - Ray fails to start in many ways (OSError, RuntimeError, its own)
        where = f"reach Ray at {address}" if address else "start a local Ray"
        raise TargetUnavailable(f"--ray: cannot {where} ({type(exc).__name__}: {first_line(exc)}); "
                                f"serve without --ray, or check Ray with `ray status`") from exc
    return True


def on_loopback(address: str | None) -> bool:
    """A local Ray, or an address on loopback (which Ray would otherwise rewrite to this machine's address)."""
    if not address:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def ray_on_loopback_for(address: str | None) -> Iterator[None]:
    """For as long as this process uses Ray: every Ray client in it (Serve's too) finds Ray on loopback when
    it is local or its address is a loopback one."""
    if not on_loopback(address):
        yield
        return
    with environ(**{LOOPBACK_ENV: "0"}), ray_on_loopback(True):
        yield


def deploy(serve, ray, model: Model, options: RayServeOptions):
    """The application (not yet waited for): replicas of ModelReplica and the shared Stats actor."""
    serve.start(http_options={"host": options.host, "port": options.http_port},
                **({} if options.address else {"proxy_location": "HeadOnly"}))
    stats = ray.remote(num_cpus=0)(Stats).remote(model.name)
    scale = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                     "target_ongoing_requests": max(2, model.max_batch_size)}}
             if options.autoscale else {"num_replicas": options.replicas})
    deployment = serve.deployment(
        ModelReplica, name=model.name, ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=max(64, 4 * model.max_batch_size), graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
        graceful_shutdown_wait_loop_s=0.2, **scale)
    app = deployment.bind(str(model.source), model.name, options.threads, model.max_batch_size,
                          options.max_queue_delay_us, stats, not options.address)
    serve._run(app, name=model.name, route_prefix="/", _blocking=False)
    return stats


def wait_ready(serve, model: Model, url: str, options: RayServeOptions, stopping: threading.Event) -> None:
    """Until the application runs and the proxy routes to it; TargetUnavailable (one line) when its deployment
    fails or the deadline passes first."""
    deadline = time.monotonic() + options.ready_timeout
    while time.monotonic() < deadline and not stopping.is_set():
        app = serve.status().applications.get(model.name)
        state = str(getattr(app, "status", "")).rsplit(".", 1)[-1]
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise TargetUnavailable(f"Ray Serve could not start {model.name}: {first_line(Exception(app.message))}")
        if state == "RUNNING":
            try:
                with urllib.request.urlopen(f"{url}/v2/models/{model.name}/ready", timeout=2.0) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
        stopping.wait(0.2)
    if not stopping.is_set():
        raise TargetUnavailable(f"Ray Serve did not get {model.name} ready within {options.ready_timeout:.0f} s "
                                f"(too few CPUs for {options.replica_text}? see `ray status`)")


def serve_on_ray(source: Path, options: RayServeOptions, *, on_ready: Callable[[str], None] = print,
                 log: Callable[[str], None] | None = None) -> int:
    """Serve the artefact of ``source`` on Ray Serve until SIGTERM or SIGINT; 0 after a drain."""
    options = options.check()
    require("ray.serve", "ray", "dlopt serve --ray needs Ray Serve")
    import ray
    from ray import serve

    model = resolve_model(Path(source), options)
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = False
    try:
        if log:
            log(f"starting Ray Serve for {model.name} ({model.key}) on {options.address or 'a local Ray'}")
        with ray_on_loopback_for(options.address):
            started = start_ray(ray, options)
            for sig in previous:  # ray.init put its own SIGTERM handlers (Python's and a C++ one) in their place
                signal.signal(sig, lambda *_: stopping.set())
            return _serve(serve, ray, model, options, stopping, started, on_ready, log)
    finally:
        if started:
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(serve, ray, model: Model, options: RayServeOptions, stopping: threading.Event, started: bool,
           on_ready: Callable[[str], None], log: Callable[[str], None] | None) -> int:
    host = options.host if options.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{options.http_port}"
    try:
        deploy(serve, ray, model, options)
        wait_ready(serve, model, url, options, stopping)
        if not stopping.is_set():
            on_ready(f"serving {model.name} ({model.key}) at {url} (Ray Serve, {options.replica_text})")
        while not stopping.wait(0.5):
            pass
    finally:
        _drain(serve, model, local=started)
    if log:
        log(f"stopped {model.name}: requests accepted before the signal were answered")
    return 0


def _drain(serve, model: Model, *, local: bool) -> None:
    """Delete the application (its replicas finish what they accepted), then Serve itself on a local Ray."""
    try:
        serve.delete(model.name)
    except Exception as exc:  # noqa: BLE001 - shutting down goes on
        logger.warning("Ray Serve could not delete %s: %s", model.name, first_line(exc))
    if local:
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001
            logger.warning("Ray Serve did not shut down cleanly: %s", first_line(exc))
