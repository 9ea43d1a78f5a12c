"""What ``dlopt inspect`` shows: opset, inputs/outputs, op histogram, parameters, size."""

from __future__ import annotations

import collections

import numpy as np
import onnx

from dlopt.evaluate import input_specs, output_specs


def _op_histogram(graph: onnx.GraphProto, counts: collections.Counter) -> None:
    for node in graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _op_histogram(sub, counts)


def summarize(proto: onnx.ModelProto, *, include_histogram: bool = True) -> dict:
    """A JSON-ready description of ``proto`` (external data is counted, not read)."""
    opsets = {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    counts: collections.Counter = collections.Counter()
    _op_histogram(proto.graph, counts)
    data = {
        "ir_version": proto.ir_version,
        "opset": opsets.get("ai.onnx"),
        "opsets": opsets,
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [s.describe() for s in input_specs(proto)],
        "outputs": [s.describe() for s in output_specs(proto)],
        "nodes": sum(counts.values()),
        "parameters": params,
    }
    if include_histogram:
        data["ops"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return data


def backend_support(proto: onnx.ModelProto, profile) -> dict[str, dict]:
    """For each backend of ``profile``: usable here or why not, and the model's ops it cannot take."""
    import onnx_ir as ir

    from dlopt.targets import backend_status, get_backend

    model = ir.serde.deserialize_model(proto)
    result = {}
    for name in profile.backends:
        status = backend_status(name)
        entry = {"available": status is True, "reason": "" if status is True else str(status), "unsupported": []}
        if status is True:
            backend = get_backend(name)
            entry["precisions"] = list(backend.precisions(profile))
            entry["unsupported"] = backend.supports(model)
        result[name] = entry
    return result
