"""What ``dlopt inspect`` shows: opset, inputs/outputs, op histogram, parameters, size."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx

from dlopt.core.errors import DloptError
from dlopt.core.graph_facts import op_label
from dlopt.core.pipeline import run_pipeline
from dlopt.core.specs import input_specs, output_specs
from dlopt.passes import generic_passes
from dlopt.targets import backend_status, get_backend

logger = logging.getLogger(__name__)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else list(attr.graphs))]


def _op_histogram(graph: onnx.GraphProto, counts: collections.Counter) -> None:
    for node in graph.node:
        counts[op_label(node)] += 1
        for sub in _subgraphs(node):
            _op_histogram(sub, counts)


def _parameters(graph: onnx.GraphProto) -> int:
    """Elements of ``graph``'s initializers and Constant nodes, subgraphs (If/Loop/Scan bodies) included.

    Some exporters (Paddle's) keep every weight in Constant nodes rather than initializers.
    """
    total = sum(int(np.prod(t.dims)) for t in graph.initializer)
    total += sum(int(np.prod(t.values.dims)) for t in graph.sparse_initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    total += int(np.prod(attr.t.dims))
                elif attr.name == "sparse_value":
                    total += int(np.prod(attr.sparse_tensor.values.dims))
                elif attr.name in ("value_floats", "value_ints"):
                    total += len(attr.floats) + len(attr.ints)
                elif attr.name in ("value_float", "value_int"):
                    total += 1
        total += sum(_parameters(sub) for sub in _subgraphs(node))
    return total


def summarize(proto: onnx.ModelProto, *, include_histogram: bool = True) -> dict:
    """A JSON-ready description of ``proto`` (external data is counted, not read)."""
    opsets = {(o.domain or "ai.onnx"): o.version for o in proto.opset_import}
    params = _parameters(proto.graph)
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
    """For each backend of ``profile``: usable here or why not, and the model's ops it cannot take.

    The ops are those of the model after dlopt's generic passes, as a compile asks the backends
    (a BatchNormalization folded into its Conv is no op for a backend to lack); when a pass fails,
    as it would in the compile, the model as given is asked and the entry's ``note`` says so.
    """
    import onnx_ir as ir

    model = ir.serde.deserialize_model(proto)  # the passes rewrite this copy, never ``proto``
    note = ""
    try:
        model = run_pipeline(model, generic_passes(model=model)).model
    except DloptError as exc:
        logger.warning("inspect: ops are those of the model as given: %s", exc)
        model, note = ir.serde.deserialize_model(proto), f"ops as given: {exc}"
    result = {}
    for name in profile.backends:
        status = backend_status(name)
        entry = {"available": status is True, "reason": "" if status is True else str(status), "unsupported": []}
        if note:
            entry["note"] = note
        if status is True:
            backend = get_backend(name)
            entry["precisions"] = list(backend.precisions(profile))
            entry["unsupported"] = backend.supports(model)
        result[name] = entry
    return result
