"""What runs inside Ray for ``dlopt serve --ray``: one replica of the artefact (opened with ``dlopt.load``,
as in Triton's Python backend) answering KServe V2 over HTTP, and the statistics the replicas share.

Batching: requests wait in Ray Serve's batch queue (``serve.batch``: at most ``max_batch_size`` requests,
``max_queue_delay_us`` for more to come); those with the same inputs past the batch axis run as one
batch of at most ``max_batch_size`` samples (concatenated on the first axis, outputs split back), a
request larger than that on its own.  ``max_batch_size`` 0 runs every request on its own.  The
runtime runs on one thread beside the replica's event loop, which keeps queueing the next batch.

Importable without Ray: Ray Serve is imported in the replica's constructor.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dlopt import __version__
from dlopt.core.errors import DataError, DloptError, first_line
from dlopt.deploy.kserve_v2 import HEADER_LENGTH, decode_request, encode_response, error_body, tensor_metadata


class Stats:
    """Counts over every replica (a Ray actor): Triton's statistics extension's fields."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.success = self.fail = self.samples = self.executions = 0
        self.success_ns = self.fail_ns = 0
        self.batches: dict[int, list[int]] = {}  # samples in one run -> [runs, ns]
        self.replicas: dict[str, int] = {}  # replica -> runs
        self.last_ms = 0

    def add(self, replica: str, runs: list[tuple[int, int]], ok: list[int], failed: list[int]) -> None:
        """``runs``: (samples, ns) per model run; ``ok``/``failed``: ns per request answered or not."""
        for samples, ns in runs:
            self.executions += 1
            entry = self.batches.setdefault(samples, [0, 0])
            entry[0] += 1
            entry[1] += ns
            self.replicas[replica] = self.replicas.get(replica, 0) + 1
        self.samples += sum(samples for samples, _ in runs)
        self.success += len(ok)
        self.success_ns += sum(ok)
        self.fail += len(failed)
        self.fail_ns += sum(failed)
        self.last_ms = int(time.time() * 1000)

    def snapshot(self) -> dict:
        stats = {"name": self.name, "version": "1", "last_inference": self.last_ms,
                 "inference_count": self.samples, "execution_count": self.executions,
                 "inference_stats": {"success": {"count": self.success, "ns": self.success_ns},
                                     "fail": {"count": self.fail, "ns": self.fail_ns}},
                 "batch_stats": [{"batch_size": size, "compute_infer": {"count": n, "ns": ns}}
                                 for size, (n, ns) in sorted(self.batches.items())],
                 "dlopt_replicas": dict(self.replicas)}
        return {"model_stats": [stats]}


class ModelReplica:
    """A Ray Serve deployment's replica: its ``__call__`` receives every HTTP request under the route."""

    def __init__(self, source: str, name: str, threads: int | None, max_batch_size: int,
                 max_queue_delay_us: int, stats, loopback: bool = False) -> None:
        from ray import serve

        import dlopt

        if loopback:
            _grpc_on_loopback()

        self.runner = dlopt.load(source, threads=threads)
        self.name, self.stats, self.max_samples = name, stats, max_batch_size
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dlopt-run")
        self.infer = serve.batch(max_batch_size=max(1, max_batch_size),
                                 batch_wait_timeout_s=max_queue_delay_us / 1e6)(self._batch)
        self.output_names = [s.name for s in self.runner.outputs]
        self.metadata = {"name": name, "versions": ["1"], "platform": f"dlopt_{self.runner.backend}",
                         "inputs": [tensor_metadata(s) for s in self.runner.inputs],
                         "outputs": [tensor_metadata(s) for s in self.runner.outputs],
                         "parameters": {"key": self.runner.key, "precision": self.runner.precision,
                                        "max_batch_size": max_batch_size, "max_queue_delay_us": max_queue_delay_us}}

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        parts = [p for p in request.url.path[len(request.scope.get("root_path", "")):].split("/") if p]
        try:
            if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
                return Response(status_code=200)
            if parts == ["v2"]:
                return JSONResponse({"name": "dlopt", "version": __version__,
                                     "extensions": ["binary_tensor_data", "statistics"]})
            if parts[:2] != ["v2", "models"] or len(parts) < 3:
                return _error(404, f"no route {request.url.path}")
            model, rest = parts[2], parts[3:]
            if rest[:1] == ["versions"]:
                if rest[1:2] != ["1"]:
                    return _error(404, f"model {model!r} has only version 1")
                rest = rest[2:]
            if model != self.name:
                return _error(404, f"unknown model {model!r}; this server serves {self.name!r}")
            route = (request.method, tuple(rest))
            if route == ("GET", ()):
                return JSONResponse(self.metadata)
            if route == ("GET", ("ready",)):
                return Response(status_code=200)
            if route == ("GET", ("stats",)):
                return JSONResponse(await self.stats.snapshot.remote())
            if route == ("POST", ("infer",)):
                return await self._infer(request)
            return _error(404 if request.method in ("GET", "POST") else 405,
                          f"no route {request.method} {request.url.path}")
        except DloptError as exc:  # the request's fault: a 400 answer, the replica goes on
            return _error(400, first_line(exc))
        except Exception as exc:  # noqa: BLE001 - the server's fault: a 500 answer, the replica goes on
            return _error(500, f"{type(exc).__name__}: {first_line(exc)}")

    async def _infer(self, request):
        from starlette.responses import Response

        parsed = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
        feed = self.runner.checked(parsed.feed)
        outputs = await self.infer(feed)
        if isinstance(outputs, BaseException):
            raise outputs
        body, headers = encode_response(self.name, parsed, self.output_names, outputs)
        return Response(body, headers=headers)

    async def _batch(self, feeds: list[dict]) -> list:
        """Each feed's outputs (or the exception its run raised), running what can run together."""
        start = time.perf_counter_ns()
        results: list = [None] * len(feeds)
        runs = []
        loop = asyncio.get_running_loop()
        for group in self._groups(feeds):
            t0 = time.perf_counter_ns()
            try:
                outputs = await loop.run_in_executor(self.pool, self._run, [feeds[i] for i in group])
            except Exception as exc:  # noqa: BLE001 - these requests fail; the others and the replica go on
                for i in group:
                    results[i] = exc if isinstance(exc, DloptError) else DataError(f"{type(exc).__name__}: {exc}")
                continue
            runs.append((sum(len(next(iter(feeds[i].values()))) for i in group), time.perf_counter_ns() - t0))
            for i, outs in zip(group, outputs):
                results[i] = outs
        ns = time.perf_counter_ns() - start
        ok = [ns for r in results if not isinstance(r, BaseException)]
        await self.stats.add.remote(self.replica, runs, ok, [ns] * (len(results) - len(ok)))
        return results

    def _groups(self, feeds: list[dict]) -> list[list[int]]:
        """Requests that run as one batch: the same trailing dimensions and dtypes, at most max_samples samples."""
        if self.max_samples < 1 or any(not v.ndim for f in feeds for v in f.values()):
            return [[i] for i in range(len(feeds))]
        kinds: dict[tuple, list[list[int]]] = {}
        for i, feed in enumerate(feeds):
            key = tuple((name, v.shape[1:], v.dtype.str) for name, v in sorted(feed.items()))
            size = len(next(iter(feed.values())))
            groups = kinds.setdefault(key, [])
            if groups and sum(len(next(iter(feeds[j].values()))) for j in groups[-1]) + size <= self.max_samples:
                groups[-1].append(i)
            else:
                groups.append([i])
        return [g for groups in kinds.values() for g in groups]

    def _run(self, feeds: list[dict]) -> list[list[np.ndarray]]:
        if len(feeds) == 1:
            return [self.runner.run(feeds[0])]
        sizes = [len(next(iter(feed.values()))) for feed in feeds]
        batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}
        outputs = self.runner.run(batch)
        bounds = np.cumsum([0, *sizes])
        return [[out[bounds[k]:bounds[k + 1]] for out in outputs] for k in range(len(feeds))]

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


def _grpc_on_loopback() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server to [::]:0, every interface; on a local Ray
    its peers are on loopback, so it binds there (patched in this replica's process before the server starts)."""
    try:
        from ray.serve._private import replica
        bind = replica.add_port_to_grpc_server
    except (ImportError, AttributeError):
        return
    if getattr(bind, "dlopt_loopback", False):
        return

    def on_loopback(server, address: str):
        return bind(server, "127.0.0.1:" + address[len("[::]:"):] if address.startswith("[::]:") else address)

    on_loopback.dlopt_loopback = True
    replica.add_port_to_grpc_server = on_loopback


def _error(status: int, message: str):
    from starlette.responses import Response

    return Response(error_body(message), status_code=status, media_type="application/json")
