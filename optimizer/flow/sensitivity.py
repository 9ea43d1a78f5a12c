"""Per-layer INT8 sensitivity: each quantised node's own error, from cached float activations.

For every node the INT8 model quantised, the quantisation it actually applied (the
scale, zero point and axis of the Q/DQ pairs on the node's inputs, and on its output
when that is quantised too) is replayed in numpy on the node's float inputs, and the
node alone is run on ONNX Runtime.  Its error is the normalised squared error of
that output against the float output::

    error = sum((quantised - float) ** 2) / sum(float ** 2)

The float activations come from one run of the float model per feed, with every
tensor a quantised node reads or writes added as a graph output; nothing is
calibrated or quantised again, so ranking a transformer takes seconds, not one
``quantize_static`` per node.  A node that cannot be replayed alone (a subgraph, an
op ORT refuses on its own) gets ``nan`` and sorts last.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from dlopt.core.layout import samples_in
from dlopt.core.ort_sessions import cpu_session_options

logger = logging.getLogger(__name__)

Feed = Mapping[str, np.ndarray]

RANK_FEEDS = 4  # float activations are cached for at most this many feeds ...
RANK_SAMPLES = 8  # ... and this many samples, when the batch axis can be cut
_PROTO_LIMIT = 1_800_000_000  # beyond this a model travels to ORT through a file with external data


@dataclass(frozen=True)
class NodeSensitivity:
    """One quantised node and the output error its own quantisation causes (``nan``: not measured)."""

    name: str
    op_type: str
    error: float

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type,
                "error": None if math.isnan(self.error) else float(f"{self.error:.4g}")}


def quantized_nodes(int8_model: ir.Model) -> list[tuple[str, str]]:
    """(name, op_type) of nodes fed by a DequantizeLinear, i.e. running on quantised data."""
    found = []
    for node in int8_model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
               for v in node.inputs):
            found.append((node.name, node.op_type))
    return found


def rank(sensitivities: Sequence[NodeSensitivity]) -> list[NodeSensitivity]:
    """Most sensitive first; unmeasured nodes last, in their original order."""
    measured = sorted((s for s in sensitivities if not math.isnan(s.error)), key=lambda s: s.error, reverse=True)
    return measured + [s for s in sensitivities if math.isnan(s.error)]


@dataclass(frozen=True)
class _Quant:
    """The affine quantisation of one tensor: q = clip(round(x / scale) + zero_point)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def _shape(self, a: np.ndarray, ndim: int) -> np.ndarray:
        if a.ndim == 0 or ndim == 0:
            return a
        shape = [1] * ndim
        shape[self.axis % ndim] = a.size
        return a.reshape(shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        scale = self._shape(self.scale.astype(np.float32), q.ndim)
        zp = self._shape(self.zero_point.astype(np.float32), q.ndim)
        return ((q.astype(np.float32) - zp) * scale).astype(np.float32)

    def fake(self, x: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.zero_point.dtype)
        scale = self._shape(self.scale.astype(np.float32), x.ndim)
        zp = self._shape(self.zero_point.astype(np.float32), x.ndim)
        q = np.clip(np.rint(x.astype(np.float32) / scale) + zp, info.min, info.max)
        return ((q - zp) * scale).astype(x.dtype)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _quant(node: ir.Node) -> _Quant | None:
    """Scale, zero point and axis of a QuantizeLinear or DequantizeLinear node."""
    scale = _constant(node.inputs[1])
    if scale is None:
        return None
    zp = _constant(node.inputs[2]) if len(node.inputs) > 2 else None
    if zp is None:  # the default zero point is uint8 0
        zp = np.zeros(scale.shape, np.uint8)
    if not np.issubdtype(zp.dtype, np.integer):  # float8 and friends: not replayed here
        return None
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    return _Quant(scale, zp, axis)


@dataclass(frozen=True)
class _Input:
    """How the INT8 model feeds one input of a node: a constant, or a float tensor (maybe fake-quantised)."""

    constant: np.ndarray | None = None
    tensor: str | None = None
    quant: _Quant | None = None
    smooth: np.ndarray | None = None  # SmoothQuant's per-channel factor the INT8 model multiplies by first

    def value(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        x = values[self.tensor]
        if self.smooth is not None:
            x = (x * self.smooth).astype(x.dtype)
        return self.quant.fake(x) if self.quant is not None else x


def _unsmooth(value: ir.Value) -> tuple[ir.Value, np.ndarray | None]:
    """NNCF's SmoothQuant puts ``Mul(x, factor)`` before the Q: replay it from ``x``."""
    node = value.producer()
    if node is None or node.op_type != "Mul" or len(node.inputs) != 2:
        return value, None
    for i in (0, 1):
        factor = _constant(node.inputs[1 - i])
        if factor is not None and node.inputs[i] is not None and _constant(node.inputs[i]) is None:
            return node.inputs[i], factor
    return value, None


def _input_plan(int8_value: ir.Value | None, float_value: ir.Value | None, tensors: set[str]) -> _Input | None:
    producer = int8_value.producer() if int8_value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        const = _constant(float_value)
        return _Input(constant=const) if const is not None else _Input(tensor=float_value.name)
    dq = _quant(producer)
    stored = producer.inputs[0]
    q_node = stored.producer() if stored is not None else None
    if q_node is not None and q_node.op_type == "QuantizeLinear":  # Q->DQ: replay it on the float value
        quant = _quant(q_node)
        source = q_node.inputs[0]
        const = _constant(source)
        if quant is None or dq is None:
            return None
        if const is not None:
            return _Input(constant=quant.fake(const))
        if source.name not in tensors:  # a tensor the quantiser made, e.g. NNCF's SmoothQuant Mul
            source, smooth = _unsmooth(source)
            return _Input(tensor=source.name, quant=quant, smooth=smooth)
        return _Input(tensor=source.name, quant=quant)
    stored_value = _constant(stored)  # a weight stored quantised: dequantising it is its fake-quantised value
    if dq is None or stored_value is None:
        return None
    return _Input(constant=dq.dequantize(stored_value))


def _output_quant(int8_node: ir.Node) -> _Quant | None:
    """The Q/DQ the INT8 model puts on the node's first output, if any."""
    out = int8_node.outputs[0]
    for user, _ in out.uses():
        if user.op_type == "QuantizeLinear" and any(u.op_type == "DequantizeLinear" for u, _ in user.outputs[0].uses()):
            return _quant(user)
    return None


@dataclass
class _Replay:
    name: str
    op_type: str
    inputs: list[_Input | None]
    output: str
    output_quant: _Quant | None
    session: object | None = None
    sq_err: float = 0.0
    sq_ref: float = 0.0
    failed: bool = False


def tensor_names(model: ir.Model) -> set[str]:
    """Names of the tensors a run of ``model`` computes or is fed."""
    return {v.name for v in model.graph.inputs} | {v.name for n in model.graph for v in n.outputs if v.name}


def _plans(float_model: ir.Model, int8_model: ir.Model) -> list[_Replay]:
    floats = {n.name: n for n in float_model.graph if n.name}
    int8s = {n.name: n for n in int8_model.graph if n.name}
    tensors = tensor_names(float_model)
    plans = []
    for name, op_type in quantized_nodes(int8_model):
        fnode, qnode = floats.get(name), int8s.get(name)
        if (fnode is None or qnode is None or len(fnode.inputs) != len(qnode.inputs) or not fnode.outputs
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in fnode.attributes.values())):
            logger.debug("sensitivity: %s (%s) has no float twin that runs alone", name, op_type)
            continue
        try:
            inputs = [None if fv is None else _input_plan(qv, fv, tensors)
                      for qv, fv in zip(qnode.inputs, fnode.inputs)]
        except Exception as exc:  # an odd pattern is an unmeasured node, never a failed compile
            logger.debug("sensitivity: cannot read the quantisation of %s: %s", name, exc)
            continue
        if any(p is None or (p.tensor is not None and p.tensor not in tensors)
               for p, v in zip(inputs, fnode.inputs) if v is not None):
            logger.debug("sensitivity: %s reads a tensor the float model does not have", name)
            continue
        plans.append(_Replay(name, op_type, inputs, fnode.outputs[0].name, _output_quant(qnode)))
    return plans


def _session(proto: onnx.ModelProto, threads: int, folder: Path | None = None):
    import onnxruntime as ort

    options = cpu_session_options(threads, level="ORT_ENABLE_BASIC")
    # no arena: a session kept for every quantised node would otherwise hold its largest activation
    options.enable_cpu_mem_arena = False
    if proto.ByteSize() < _PROTO_LIMIT or folder is None:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    path = folder / "float.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="float.onnx.data")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _single_node(float_model: ir.Model, plan: _Replay, node: ir.Node, feed_values: dict[str, np.ndarray]):
    """A one-node model: constant inputs as initializers, tensors as graph inputs."""
    from onnx import helper, numpy_helper

    proto_node = ir.serde.serialize_node(node)
    inputs, inits, names = [], [], []
    for i, (p, value) in enumerate(zip(plan.inputs, node.inputs)):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if p.constant is not None:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(p.constant), name))
        else:
            arr = feed_values[p.tensor]
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), None))
    del proto_node.input[:]
    proto_node.input.extend(names)
    outs = [f"out{i}" if o is not None and o.name else "" for i, o in enumerate(node.outputs)]
    del proto_node.output[:]
    proto_node.output.extend(outs)
    graph = helper.make_graph([proto_node], "layer", inputs, [onnx.ValueInfoProto(name="out0")], inits)
    opsets = [helper.make_opsetid(domain if domain != "ai.onnx" else "", version)
              for domain, version in float_model.opset_imports.items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=float_model.ir_version or 8)
    return model


def _one_sample_at_a_time(feeds: Sequence[Feed], cut: bool):
    """Each feed's samples one by one when the batch axis can be cut, else each feed whole."""
    for feed in feeds:
        if not cut:
            yield dict(feed)
            continue
        for i in range(samples_in(feed)):
            yield {k: v[i:i + 1] for k, v in feed.items()}


def _batched_inputs(model: ir.Model) -> bool:
    """Whether every graph input has a free leading (batch) dimension, so feeds can be cut."""
    for value in model.graph.inputs:
        shape = value.shape
        if shape is None or len(shape) == 0 or isinstance(shape[0], int):
            return False
    return True


def layer_errors(
    float_model: ir.Model,
    int8_model: ir.Model,
    feeds: Sequence[Feed],
    *,
    threads: int,
    deadline: float | None = None,
) -> tuple[list[NodeSensitivity], int]:
    """Each quantised node's own output error (see module doc), in graph order, and the samples used.

    Feeds are cut to ``RANK_SAMPLES`` samples; ``deadline`` (``time.monotonic()``) stops early,
    leaving the nodes not measured by then at ``nan``.
    """
    plans = _plans(float_model, int8_model) if deadline is None or time.monotonic() <= deadline else []
    floats = {n.name: n for n in float_model.graph if n.name}
    wanted = {p.tensor for plan in plans for p in plan.inputs if p is not None and p.tensor}
    wanted |= {plan.output for plan in plans}
    graph_inputs = {v.name for v in float_model.graph.inputs}
    proto = ir.serde.serialize_model(float_model)
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(wanted - present - graph_inputs))
    cut = _batched_inputs(float_model)
    samples = 0
    with tempfile.TemporaryDirectory(prefix="dlopt-sensitivity-") as tmp:
        session = _session(proto, threads, Path(tmp))
        del proto
        names = [o.name for o in session.get_outputs()]
        for feed in _one_sample_at_a_time(feeds[:RANK_FEEDS], cut):
            if samples >= RANK_SAMPLES or (deadline is not None and time.monotonic() > deadline):
                break
            samples += 1 if cut else samples_in(feed)
            # every tensor of one sample at a time: memory is one sample's activations, not a batch's
            values = dict(zip(names, session.run(None, feed)))
            values.update(feed)
            for plan in plans:
                if not plan.failed and (deadline is None or time.monotonic() <= deadline):
                    _accumulate(float_model, plan, floats[plan.name], values, threads)
            del values
    errors = {p.name: p.sq_err / p.sq_ref for p in plans if not p.failed and p.sq_ref > 0}
    return [NodeSensitivity(name, op_type, errors.get(name, math.nan))
            for name, op_type in quantized_nodes(int8_model)], samples


def _accumulate(float_model: ir.Model, plan: _Replay, node: ir.Node, values: dict, threads: int) -> None:
    try:
        if plan.session is None:
            plan.session = _session(_single_node(float_model, plan, node, values), threads)
        feed = {}
        for i, p in enumerate(plan.inputs):
            if p is not None and p.constant is None:
                feed[f"in{i}"] = p.value(values)
        got = plan.session.run(None, feed)[0]
        if plan.output_quant is not None:
            got = plan.output_quant.fake(got)
        ref = values[plan.output]
        if ref.shape != got.shape or not np.issubdtype(ref.dtype, np.floating):
            raise ValueError(f"output {got.dtype}{got.shape} is not comparable with {ref.dtype}{ref.shape}")
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        both = np.isfinite(ref) & np.isfinite(got)  # a -inf attention mask is -inf in both: not an error
        plan.sq_err += float(np.sum((got[both] - ref[both]) ** 2))
        plan.sq_ref += float(np.sum(ref[both] ** 2))
    except Exception as exc:  # replaying one node is best effort: it then ranks last
        logger.debug("sensitivity: %s (%s) not measured: %s", plan.name, plan.op_type, exc)
        plan.failed = True
        plan.session = None
