"""The KServe V2 inference protocol over HTTP, as far as tritonclient's HTTP client speaks it: infer
requests and responses with JSON tensors or the binary-data extension, model metadata and errors.

Pure functions over bytes and dicts (no server here): ``dlopt serve --ray``'s replicas answer with them.

Binary-data extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes, then
each tensor flagged ``parameters.binary_data_size`` as raw little-endian bytes, in order.  A
response uses it for an output asked for with ``parameters.binary_data`` (or, when no output is
named, for all of them with the request's ``parameters.binary_data_output``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from dlopt.core.errors import DataError

HEADER_LENGTH = "Inference-Header-Content-Length"
_DATATYPES = {"BOOL": "bool", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
              "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
              "FP16": "float16", "FP32": "float32", "FP64": "float64"}
_NAMES = {(np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in _DATATYPES.items()}


def datatype(dtype) -> str:
    """The V2 datatype of a NumPy dtype ("FP32"); DataError for one the protocol has no name for here."""
    try:
        return _NAMES[np.dtype(dtype).kind, np.dtype(dtype).itemsize]
    except KeyError:
        raise DataError(f"tensors of type {np.dtype(dtype).name} cannot be sent over KServe V2 here") from None


def numpy_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(_DATATYPES[name]).newbyteorder("<")
    except (KeyError, TypeError):
        raise DataError(f"datatype {name!r} is not one of {', '.join(_DATATYPES)}") from None


def tensor_metadata(spec) -> dict:
    """``{"name", "datatype", "shape"}`` of a TensorSpec; symbolic or unknown dimensions are -1."""
    dtype = datatype(spec.dtype) if spec.dtype is not None else "BYTES"
    return {"name": spec.name, "datatype": dtype, "shape": [d if isinstance(d, int) and d >= 0 else -1
                                                             for d in spec.shape]}


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    feed: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None  # None: every output
    binary: frozenset[str] | bool  # output names answered in binary, or True/False for all


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request's tensors; DataError (a 400 answer) for anything malformed."""
    try:
        size = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise DataError(f"{HEADER_LENGTH} must be a byte count, got {header_length!r}") from None
    if not 0 < size <= len(body):
        raise DataError(f"{HEADER_LENGTH} {size} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"the request's JSON is malformed: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise DataError("an infer request is a JSON object with a list of 'inputs'")
    offset, feed = size, {}
    for item in header["inputs"]:
        array, offset = _tensor(item, body, offset)
        feed[item["name"]] = array
    if offset != len(body):
        raise DataError(f"{len(body) - offset} bytes of binary data follow the tensors the header declares")
    outputs = header.get("outputs")
    params = header.get("parameters") or {}
    if outputs is None:
        return InferRequest(header.get("id"), feed, None, bool(params.get("binary_data_output", False)))
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise DataError("'outputs' must be a list of objects with a 'name'")
    binary = frozenset(o["name"] for o in outputs if (o.get("parameters") or {}).get("binary_data"))
    return InferRequest(header.get("id"), feed, tuple(o["name"] for o in outputs), binary)


def _tensor(item, body: bytes, offset: int) -> tuple[np.ndarray, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise DataError("each input is an object with a 'name', 'shape', 'datatype' and data")
    name, shape = item["name"], item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    dtype = numpy_dtype(item.get("datatype"))
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = (item.get("parameters") or {}).get("binary_data_size")
    if nbytes is not None:
        if not isinstance(nbytes, int) or nbytes != count * dtype.itemsize or offset + nbytes > len(body):
            raise DataError(f"input {name!r}: binary_data_size {nbytes!r} does not match shape {shape} of "
                            f"{item['datatype']} or the bytes sent")
        array = np.frombuffer(body, dtype, count, offset).reshape(shape)
        return array.astype(dtype.newbyteorder("="), copy=True), offset + nbytes
    try:
        array = np.asarray(item.get("data"), dtype=dtype.newbyteorder("="))
        return array.reshape(shape), offset
    except (TypeError, ValueError) as exc:
        raise DataError(f"input {name!r}: 'data' does not hold {count} {item['datatype']} values: {exc}") from None


def encode_response(model: str, request: InferRequest, names: list[str],
                    outputs: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; binary outputs after the JSON header, as asked."""
    by_name = dict(zip(names, outputs))
    wanted = request.outputs if request.outputs is not None else tuple(names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise DataError(f"model {model!r} has no output {unknown[0]!r}; its outputs: {', '.join(names)}")
    tensors, blobs = [], []
    for name in wanted:
        array = np.ascontiguousarray(by_name[name])
        entry = {"name": name, "datatype": datatype(array.dtype), "shape": list(array.shape)}
        if request.binary is True or (not isinstance(request.binary, bool) and name in request.binary):
            blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        tensors.append(entry)
    answer = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        answer["id"] = request.id
    header = json.dumps(answer).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
