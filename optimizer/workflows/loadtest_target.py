"""The server side of a load test: a KServe V2 server's URL, its model's metadata, the feeds, one client.

Every call has a deadline.  Inputs are dlopt's random feeds for the declared shapes (``-1`` dims:
``batch`` for the batch axis, ``--shape`` for the others) or an ``.npz`` read by dlopt's checked
reader (no pickles, sizes checked from the headers).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dlopt.core.errors import ConfigError, DataError, first_line
from dlopt.core.specs import InputSpec

DEFAULT_TIMEOUT_S = 30.0
FEED_SETS = 8  # distinct random feeds, cycled


# -- the server's side: URL, models, metadata (every call with a deadline) --------------------------

@dataclass(frozen=True)
class Model:
    """A served model as its metadata declares it: inputs (-1 dims as None) and output names."""

    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]


def check_url(text: str) -> str:
    """``http://HOST:PORT`` (a trailing slash dropped); ConfigError for anything else."""
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/") or parsed.query:
        raise ConfigError(f"a server URL is http://HOST:PORT (KServe V2 over HTTP), got {text!r}")
    try:
        parsed.port
    except ValueError:
        raise ConfigError(f"a server URL is http://HOST:PORT with a port from 1 to 65535, got {text!r}") from None
    return f"http://{parsed.netloc}"


def _call(url: str, path: str, timeout: float, *, post: bool = False) -> object:
    request = urllib.request.Request(url + path, data=b"{}" if post else None, method="POST" if post else "GET",
                                     headers={"Content-Type": "application/json"} if post else {})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read(1 << 24) or b"null")


def _unreachable(url: str, exc: BaseException) -> ConfigError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return ConfigError(f"cannot reach a KServe V2 server at {url}: {first_line(reason)}; start one "
                       f"(dlopt serve OUT) or check the URL")


def resolve_model(url: str, name: str | None = None, *, timeout: float = 10.0) -> Model:
    """The model to load: ``name``, or the server's only ready model; its metadata."""
    url = check_url(url)
    try:
        _call(url, "/v2/health/ready", timeout)
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"the server at {url} is not ready (HTTP {exc.code} from /v2/health/ready)") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _unreachable(url, exc) from exc
    names = _model_names(url, timeout)
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none it lists"
            raise ConfigError(f"the server at {url} has {len(names) or 'no'} ready models ({listed}); "
                              f"name one with --model NAME")
        name = names[0]
    try:
        meta = _call(url, f"/v2/models/{urllib.parse.quote(name, safe='')}", timeout)
    except urllib.error.HTTPError as exc:
        listed = f"; its models: {', '.join(names)}" if names else ""
        raise ConfigError(f"the server at {url} has no model {name!r} (HTTP {exc.code}){listed}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _unreachable(url, exc) from exc
    try:
        inputs = tuple(InputSpec(t["name"], _dtype(t["datatype"]), tuple(None if d < 0 else int(d) for d in t["shape"]))
                       for t in meta["inputs"])
        outputs = tuple(t["name"] for t in meta.get("outputs", ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the metadata of {name!r} at {url} is not KServe V2 model metadata: "
                          f"{first_line(exc)}") from exc
    return Model(name, inputs, outputs)


def _model_names(url: str, timeout: float) -> list[str]:
    """Ready models from the repository index (Triton), else /v2/models; [] when the server lists none."""
    for path, post in (("/v2/repository/index", True), ("/v2/models", False)):
        try:
            found = _call(url, path, timeout, post=post)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        entries = found.get("models", []) if isinstance(found, dict) else found
        if isinstance(entries, list):
            return sorted({e["name"] if isinstance(e, dict) else str(e) for e in entries
                           if not isinstance(e, dict) or e.get("state", "READY") == "READY" and "name" in e})
    return []


def _dtype(datatype: str) -> np.dtype:
    from tritonclient.utils import triton_to_np_dtype

    dtype = triton_to_np_dtype(datatype)
    if dtype is None or np.dtype(dtype).kind == "O":
        raise ConfigError(f"dlopt loadtest cannot make {datatype} inputs; it sends numeric tensors only")
    return np.dtype(dtype)


# -- feeds ------------------------------------------------------------------------------------------

def random_feeds(model: Model, *, batch: int = 1, shapes: Mapping[str, tuple[int, ...]] | None = None,
                 seed: int = 0, count: int = FEED_SETS) -> list[dict[str, np.ndarray]]:
    """dlopt's random feeds for the declared inputs: the batch dim ``batch``, others from ``shapes``."""
    from dlopt.core.inputs import RandomInputs
    from dlopt.core.shapes import declared_shapes

    try:
        concrete = declared_shapes(model.inputs, batch=batch, shapes=shapes)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("evaluation data with --eval", "real inputs with --input")) from exc
    return RandomInputs(model.inputs).feeds(concrete, count, seed)


def npz_feeds(path: Path, model: Model, *, batch: int = 1) -> list[dict[str, np.ndarray]]:
    """Batches of ``batch`` samples from an ``.npz`` (one array per input, first axis = samples; no
    pickles, sizes checked from the headers); a short last batch is dropped when there are others."""
    from dlopt.calibration.npz import NpzDataset

    feeds = list(NpzDataset(path, model.inputs, batch_size=batch))
    if len(feeds) > 1 and _rows(feeds[-1]) != _rows(feeds[0]):
        feeds.pop()
    return feeds


def _rows(feed: Mapping[str, np.ndarray]) -> tuple:
    return tuple(a.shape for a in feed.values())


# -- the client's side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Requests:
    """The feeds as tritonclient tensors, serialised once and shared by every client (read-only there)."""

    model: str
    inputs: tuple  # one list of InferInput per feed, cycled
    outputs: tuple  # InferRequestedOutput per output, as binary data

    @classmethod
    def prepare(cls, model: Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> "Requests":
        import tritonclient.http as http
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for feed in feeds:
            tensors = []
            for name, array in feed.items():
                tensor = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(np.ascontiguousarray(array), binary_data=True)
                tensors.append(tensor)
            inputs.append(tensors)
        return cls(model.name, tuple(inputs), tuple(http.InferRequestedOutput(n, binary_data=True)
                                                   for n in model.outputs))


class Client:
    """One tritonclient HTTP client: one per thread (it is not thread-safe)."""

    def __init__(self, url: str, requests: Requests, timeout: float) -> None:
        import tritonclient.http as http

        self.client = http.InferenceServerClient(url.removeprefix("http://"), connection_timeout=min(timeout, 10.0),
                                                 network_timeout=timeout)
        self.requests = requests
        self.count = 0

    def send(self) -> str | None:
        """One request; None when answered, else the error's first line."""
        r = self.requests
        tensors = r.inputs[self.count % len(r.inputs)]
        self.count += 1
        try:
            self.client.infer(r.model, tensors, outputs=list(r.outputs) or None)
            return None
        except Exception as exc:  # an error answer, a deadline, a dropped connection: counted, the load goes on
            return first_line(exc, 200)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a client whose connection already broke
            pass


def check_request(url: str, model: Model, feeds: Sequence[Mapping[str, np.ndarray]], *,
                  timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """One request before any load: a DataError (one line) when the server refuses the feeds."""
    sender = Client(check_url(url), Requests.prepare(model, feeds[:1]), timeout)
    try:
        error = sender.send()
    finally:
        sender.close()
    if error is not None:
        shapes = ", ".join(f"{n}={'x'.join(map(str, a.shape))} {a.dtype.name}" for n, a in feeds[0].items())
        raise DataError(f"{model.name} at {url} refused a request of {shapes}: {error}; fix --input, --batch "
                        f"or --shape")
