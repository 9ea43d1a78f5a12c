"""``dlopt loadtest``: closed-loop concurrency and open-loop rates against a KServe V2 server.

Only click is imported with this module so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import click

_SERVER_FLAGS = ("--max-batch-size", "--max-queue-delay-us", "--instances", "--threads", "--ready-timeout")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("target")
@click.option("--concurrency", default=None, metavar="N,N,...",
              help="Closed-loop levels: N workers, each sends its next request when its last one answered "
                   "[default: 1,2,4,8,16 unless --rate is given].")
@click.option("--rate", default=None, metavar="R,R,...",
              help="Open-loop levels in requests/s: requests are sent when due whether or not earlier ones "
                   "answered, and latency counts from when each was due (queueing is not hidden).")
@click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True,
              help="Open-loop arrivals: Poisson (seeded by --seed) or evenly spaced.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of Poisson arrivals and random inputs.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Counted time per level [default: 10; with --tune 6, split between the rounds].")
@click.option("--warmup", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Uncounted time before each level's counted time [default: 2; with --tune 1, in every round].")
@click.option("--model", default=None,
              help="Model name [default: the server's only ready model; for a folder TARGET, the name it is served "
                   "under, as dlopt serve --name].")
@click.option("--input", "input_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=".npz with one array per model input, first axis = samples (no pickles) [default: random "
                   "inputs for the model's declared shapes].")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per request (the first -1 dim of the model's inputs).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=DxD",
              help="Shape of one input per request, or the size of a dim name, e.g. x=1x3x224x224 (repeatable).")
@click.option("--slo", default=None, metavar="P=TIME",
              help="Latency objective, e.g. p99=20ms or p95=10ms,p99=0.05s: each level holds or misses it (a "
                   "level with errors or unsent requests misses), and the summary names the highest throughput "
                   "(closed loop) or rate (open loop) that holds it.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              metavar="SECONDS", help="Deadline of every request and server call.")
@click.option("--tune", is_flag=True,
              help="Folder TARGET and --slo: serve each configuration of a small grid (batching off; largest batch "
                   "x queue delay; 1 or 2 instances) afresh, load it in closed loop (--concurrency, default 1,4,16), "
                   "in --tune-rounds rounds in rotated order; keep the simplest configuration unless another's "
                   "throughput within the objective beat it in every round (their ranges apart), and record "
                   "the rounds and the choice in the output's report.json (dlopt serve and dlopt package --triton "
                   "then use it).  Default cost on 2 cores: about 9 minutes for the 10 configurations of a model "
                   "that batches (517 s measured at load 8-13).")
@click.option("--tune-rounds", type=click.IntRange(min=1, max=20), default=None, metavar="N",
              help="--tune: rounds each configuration is served and measured in [default: 3].")
@click.option("--json", "as_json", is_flag=True, help="Print the levels as a JSON list on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=None,
              help="Folder TARGET only: the served model's largest dynamic batch; 0 turns batching off "
                   "[default: as dlopt serve].")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="Folder TARGET only: how long the batcher waits to fill a batch.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Folder TARGET only: model instances.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Folder TARGET only: intra-op threads per instance.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Folder TARGET only: seconds the server may take to load the model.")
def loadtest(target, concurrency, rate, arrival, seed, duration, warmup, model, input_path, batch, shapes, slo,
             timeout, tune, tune_rounds, as_json, quiet, max_batch_size, max_queue_delay_us, instances, threads,
             ready_timeout):
    """Load-test a served model: throughput and p50/p95/p99/max latency per load level.

    TARGET is the URL of a KServe V2 server (http://HOST:PORT: Triton, `dlopt serve`), or a
    `dlopt compile` output folder (or one of its bundle/ candidates), which is served with
    Triton on free loopback ports for the test and stopped after it (drained), whatever happens.
    The client is tritonclient's HTTP client, one per worker.

    Closed loop (--concurrency) shows the throughput N busy clients get; it hides queueing,
    because a slow answer delays the next request (coordinated omission).  Open loop (--rate)
    sends on a schedule and counts latency from when each request was due; requests no sender
    was free to send on time are "late", those still unsent at the end "unsent".  One check
    request goes first (a refused input is an error before any load).  Ctrl-C stops the test;
    a server it started is drained and gone.

    \b
    Examples:
      dlopt loadtest build/resnet-cpu --concurrency 1,2,4,8,16 --slo p99=20ms
      dlopt loadtest build/resnet-cpu --rate 50,100,200,400 --arrival poisson --duration 20
      dlopt loadtest http://127.0.0.1:8000 --model resnet --input images.npz --batch 4 --json
      dlopt loadtest build/resnet-cpu --tune --slo p99=50ms --duration 5
    """
    from dlopt.core.errors import ConfigError
    from dlopt.core.shapes import parse_shape
    from dlopt.workflows import loadtest as lt

    folder = not target.startswith(("http://", "https://"))
    given = [flag for flag, value, default in zip(
        _SERVER_FLAGS, (max_batch_size, max_queue_delay_us, instances, threads, ready_timeout),
        (None, 100, 1, None, 120)) if value != default]
    if given and not folder:
        raise ConfigError(f"{', '.join(given)} configure the server dlopt starts for an output folder; "
                          f"{target} is a server already running")
    if shapes and input_path is not None:
        raise ConfigError("--shape sets the shapes of random inputs; with --input the data's own shapes are sent")
    levels = lt.parse_levels(concurrency, "--concurrency", int) if concurrency is not None else ()
    rates = lt.parse_levels(rate, "--rate", float) if rate is not None else ()
    if not levels and not rates:
        levels = (1, 2, 4, 8, 16)
    objective = lt.parse_slo(slo) if slo is not None else None
    shape_map = dict(parse_shape(text) for text in shapes)
    if folder and not Path(target).is_dir():
        raise ConfigError(f"TARGET is a server URL (http://HOST:PORT) or a dlopt output folder; {target} is neither")

    def log(line: str) -> None:
        if not quiet:
            click.echo(f"dlopt: {line}", err=True)

    if tune:
        _check_tune(target, folder, objective, rates, given, input_path, shapes, model, batch)
        _tune(Path(target), objective, levels if concurrency is not None else None, duration, warmup, tune_rounds,
              as_json, log)
        return
    if tune_rounds is not None:
        raise ConfigError("--tune-rounds is the number of rounds of --tune; add --tune")
    duration = 10.0 if duration is None else duration
    warmup = 2.0 if warmup is None else warmup
    done: list = []
    with _Interruptible() as guard:
        server = (_serving(Path(target), guard, log, name=model, max_batch_size=max_batch_size,
                           max_queue_delay_us=max_queue_delay_us, instances=instances, threads=threads,
                           ready_timeout=ready_timeout)
                  if folder else contextlib.nullcontext((target, None)))
        try:
            with server as (url, served_name):
                chosen = lt.resolve_model(url, model or served_name, timeout=min(timeout, 10.0))
                feeds = (lt.npz_feeds(input_path, chosen, batch=batch) if input_path is not None
                         else lt.random_feeds(chosen, batch=batch, shapes=shape_map, seed=seed))
                lt.check_request(url, chosen, feeds, timeout=timeout)
                log(f"load-testing {chosen.name} at {url}")
                lt.sweep(url, chosen, feeds, concurrency=levels, rates=rates, duration=duration, warmup=warmup,
                         arrival=arrival, seed=seed, timeout=timeout, progress=log, stop=guard.stop, levels=done)
        except KeyboardInterrupt:
            guard.interrupted = True
    _print(done, objective, as_json)
    if guard.interrupted:
        click.echo(f"dlopt: interrupted after {len(done)} level(s)"
                   + ("; the server it started was stopped" if folder else ""), err=True)
        sys.exit(130)


def _check_tune(target, folder, objective, rates, given, input_path, shapes, model, batch) -> None:
    from dlopt.core.errors import ConfigError

    if not folder:
        raise ConfigError(f"--tune serves an output folder afresh in each configuration; {target} is a server URL")
    if objective is None:
        raise ConfigError("--tune keeps the configuration with the most throughput within an objective: give "
                          "--slo, e.g. --slo p99=50ms")
    chosen_here = [f for f, v in (("--rate", rates), ("--input", input_path), ("--shape", shapes), ("--model", model),
                                  ("--batch", batch != 1)) if v] + list(given)
    if chosen_here:
        raise ConfigError(f"--tune chooses the batching, instances and threads itself and loads each configuration "
                          f"in closed loop with random single-sample inputs; drop {', '.join(chosen_here)}")


def _tune(folder: Path, objective, levels, duration, warmup, rounds, as_json: bool, log) -> None:
    """``--tune``: the grid served and loaded in rounds, the choice recorded in the output's report.json."""
    from dlopt.targets import read_artifact
    from dlopt.workflows import serve_tune as st

    _, root = read_artifact(folder)
    with _Interruptible() as guard:
        try:
            result = st.tune(folder, objective, concurrency=levels or st.CONCURRENCY,
                             duration=st.DURATION_S if duration is None else duration,
                             warmup=st.WARMUP_S if warmup is None else warmup,
                             rounds=st.ROUNDS if rounds is None else rounds, stop=guard.stop, progress=log)
        except KeyboardInterrupt:
            guard.interrupted = True
    if guard.interrupted or guard.stop.is_set():
        click.echo("dlopt: interrupted; nothing was recorded", err=True)
        sys.exit(130)
    st.record(root, result)
    if as_json:
        click.echo(st.to_json(result))
    else:
        from tabulate import tabulate

        click.echo(tabulate(st.table(result), headers=st.HEADERS, disable_numparse=True))
        click.echo(f"chosen: {result.why}" if result.chosen else result.why)
    click.echo(f"dlopt: {'chosen ' + result.chosen.config.label if result.chosen else 'nothing chosen'}; "
               f"recorded in {root / 'report.json'} ({result.seconds:.0f} s)", err=True)


class _Interruptible:
    """SIGINT/SIGTERM while the test runs: the first stops the load (KeyboardInterrupt in the main thread,
    unless a server is being stopped), a later one kills a server still draining."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.raising = True
        self.interrupted = False
        self.server = None

    def __enter__(self) -> "_Interruptible":
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self.previous:
            signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        first = not self.stop.is_set()
        self.stop.set()
        self.interrupted = True
        if first and self.raising:
            raise KeyboardInterrupt
        if not first and self.server is not None and self.server.process is not None:
            import os

            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.server.process.pid, signal.SIGKILL)


@contextlib.contextmanager
def _serving(folder: Path, guard: _Interruptible, log, **options):
    """The artefact of ``folder`` served by tritonserver on free loopback ports; drained and gone after."""
    from dlopt.deploy.serve import ServeOptions, free_ports, served

    http_port, grpc_port, metrics_port = free_ports(3)
    settings = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, **options)
    with served(folder, settings, guard.stop, log) as (server, model):
        guard.server = server
        try:
            if guard.stop.is_set():
                raise KeyboardInterrupt
            log(f"serving {model.name} ({model.key}) at {server.url} (metrics "
                f"http://127.0.0.1:{metrics_port}/metrics)")
            yield server.url, model.name
        finally:
            guard.raising = False  # a signal now must not cut the drain short; a second one kills the server


def _print(levels, objective, as_json: bool) -> None:
    from dlopt.workflows.loadtest import holds, summary

    if as_json:
        rows = [{**lv.to_dict(), **({"slo": "holds" if holds(lv, objective) else "misses"} if objective else {})}
                for lv in levels]
        import json

        click.echo(json.dumps(rows, indent=2))
        for line in summary(levels, objective) if objective else ():
            click.echo(f"dlopt: {line}", err=True)
        return
    if not levels:
        return
    from tabulate import tabulate

    def cell(value):
        return "-" if value is None else value

    open_loop = any(lv.rate is not None for lv in levels)
    headers = ["load", "requests", "throughput/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"]
    headers += ["late", "unsent"] if open_loop else []
    headers += [objective.describe()] if objective else []
    rows = []
    for lv in levels:
        row = [lv.label, lv.requests, f"{lv.throughput:.1f}", *(cell(getattr(lv, f"{p}_ms")) for p in
                                                               ("p50", "p95", "p99", "max")), lv.errors]
        row += [cell(lv.late), cell(lv.unsent)] if open_loop else []
        row += ["holds" if holds(lv, objective) else "misses"] if objective else []
        rows.append(row)
    click.echo(tabulate(rows, headers=headers, floatfmt=".2f", disable_numparse=True))
    for lv in levels:
        if lv.first_error:
            click.echo(f"{lv.label}: {lv.errors} errors, the first: {lv.first_error}")
    for line in summary(levels, objective) if objective else ():
        click.echo(line)


if __name__ == "__main__":
    loadtest()
