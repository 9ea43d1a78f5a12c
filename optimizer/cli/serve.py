"""``dlopt serve``: a real Triton Inference Server for a compiled artefact, or Ray Serve with ``--ray``.

Only click is imported with this module so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--name", default=None, help="Triton model name [default: the model file's stem, made safe].")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=None,
              help="Largest batch the dynamic batcher forms; 0 turns batching off [default: 8 when every input "
                   "and output has a symbolic batch axis, else 0].")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="How long the batcher waits for more requests to fill a batch.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (each its own process and runtime session).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads per instance [default: the thread count the artefact shipped with].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP, gRPC and metrics endpoints bind; 0.0.0.0 exposes them to the network.")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus /metrics.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds the server may take to load the model (with --ray ADDRESS: also to join the cluster).")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="", metavar="[ADDRESS]",
              help="Serve on Ray Serve instead of Triton: a local Ray on this machine, listening on loopback "
                   "only, when no address is given; ADDRESS (ray://head:10001) joins a running cluster. Put it "
                   "after OUT.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: replicas of the model, each its own process and runtime session [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN-MAX",
              help="With --ray: let Ray Serve's autoscaler keep between MIN and MAX replicas (instead of "
                   "--replicas).")
def serve(out, name, max_batch_size, max_queue_delay_us, instances, threads, host, http_port, grpc_port,
          metrics_port, ready_timeout, ray_address, replicas, autoscale):
    """Serve the artefact in OUT with a real Triton Inference Server until SIGTERM or Ctrl-C.

    OUT is a `dlopt compile` output folder, or one of its bundle/<backend>-<precision>/
    candidates.  Triton's own server (from the nvidia-pytriton wheel: pip install --no-deps
    nvidia-pytriton==0.7.0) runs the artefact through dlopt.load in its Python backend, so it
    answers what `dlopt run` computes.  KServe V2 over HTTP and gRPC, /v2/health/ready, and
    Prometheus metrics (nv_inference_*) on --metrics-port.  One line says when it is ready:
    "serving NAME (KEY) at http://HOST:PORT ...".  SIGTERM or Ctrl-C drains: requests the
    server accepted are answered, then it exits 0.

    With --ray the same runner is a Ray Serve deployment: request batching (--max-batch-size
    samples per run, --max-queue-delay-us), --replicas or --autoscale, and Ray Serve's HTTP
    proxy on --host:--http-port speaking KServe V2 (JSON and binary tensors) for tritonclient and
    `dlopt loadtest`; GET /v2/models/NAME/stats counts requests, runs and the batches formed.
    It needs pip install 'dlopt[ray]'; with an ADDRESS, OUT must be at the same path on the
    cluster's nodes.  --grpc-port, --metrics-port and --instances are Triton's.

    \b
    Examples:
      dlopt serve build/resnet-cpu
      dlopt serve build/resnet-cpu --max-batch-size 16 --max-queue-delay-us 500 --instances 2
      dlopt serve build/rpi/bundle/ort-int8 --http-port 9000 --grpc-port 9001 --metrics-port 9002
      dlopt serve build/resnet-cpu --ray --replicas 2 --max-batch-size 16
      dlopt serve build/resnet-cpu --ray ray://head:10001 --autoscale 1-8 --host 0.0.0.0
    """
    if ray_address is not None:
        _serve_on_ray(out, name=name, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                      threads=threads, host=host, http_port=http_port, ready_timeout=ready_timeout,
                      address=ray_address or None, replicas=replicas, autoscale=autoscale,
                      triton_only={"--instances": instances != 1, "--grpc-port": grpc_port != 8001,
                                   "--metrics-port": metrics_port != 8002})
        return
    if replicas is not None or autoscale is not None:
        from dlopt.core.errors import ConfigError

        raise ConfigError(f"{'--replicas' if replicas is not None else '--autoscale'} is for Ray Serve: add --ray "
                          f"(Triton's own copies of the model are --instances)")
    from dlopt.deploy.serve import ServeOptions
    from dlopt.deploy.serve import serve as run_server

    options = ServeOptions(name=name, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                           instances=instances, threads=threads, host=host, http_port=http_port, grpc_port=grpc_port,
                           metrics_port=metrics_port, ready_timeout=ready_timeout)

    def ready(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    def log(line: str) -> None:
        click.echo(line, err=True)

    sys.exit(run_server(out, options, on_ready=ready, log=log))


def _serve_on_ray(out, *, replicas, autoscale, triton_only, **options) -> None:
    from dlopt.core.errors import ConfigError
    from dlopt.deploy.ray_serve import RayServeOptions, parse_autoscale, serve_on_ray

    given = [flag for flag, set_ in triton_only.items() if set_]
    if given:
        raise ConfigError(f"{given[0]} is Triton's; with --ray use --replicas/--autoscale and --http-port")
    if replicas is not None and autoscale is not None:
        raise ConfigError("--replicas and --autoscale exclude each other: a fixed count, or MIN-MAX for the autoscaler")
    config = RayServeOptions(replicas=replicas or 1, autoscale=parse_autoscale(autoscale) if autoscale else None,
                             **options)

    def ready(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    sys.exit(serve_on_ray(out, config, on_ready=ready, log=lambda line: click.echo(line, err=True)))


if __name__ == "__main__":
    serve()
