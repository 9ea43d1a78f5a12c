"""QuantizeStaticPass: INT8 post-training quantisation in QDQ form with fixed ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import onnx
import onnx_ir as ir

from dlopt.core.errors import CompileError
from dlopt.passes._ort_quant import quantise_to_proto
from dlopt.passes._scope_order import outer_reads, sort_with_outer_reads, subgraphs


class QuantizeStaticPass(ir.passes.FunctionalPass):
    """Insert QuantizeLinear/DequantizeLinear pairs with ONNX Runtime's QDQ quantiser.

    Guarantees: the result passes ONNX's checker, also with control flow (``If``/``Loop``/
    ``Scan``): the main graph's ops are quantised, subgraph ops stay float, and the main
    graph is re-sorted so that every value a subgraph reads from the outer scope is
    produced before its ``If`` (ORT's quantiser sorts by explicit inputs only and placed
    an ``If`` before the node producing what its branch read).

    Ranges come from a calibration cache written by :func:`dlopt.flow.ranges.compute_ranges`
    on the same float model, so this pass never calibrates and can run many times
    (the mixed-precision search does).  Weights are int8, symmetric and per channel
    by default; activations uint8 asymmetric (``symmetric_activations=True`` gives
    int8 symmetric, what TensorRT expects).  Nodes named in ``exclude_nodes`` stay in
    float; with ``only_nodes`` just those nodes are quantised (sensitivity ranking).
    ``reduce_range`` quantises weights to 7 bits, which int8 kernels that add u8 x s8 pairs in
    16 bits (OpenVINO on x86 CPUs without VNNI) cannot saturate.
    ``note`` gives how many nodes were quantised.
    """

    def __init__(
        self,
        *,
        ranges: Path,
        per_channel: bool = True,
        symmetric_activations: bool = False,
        exclude_nodes: Sequence[str] = (),
        only_nodes: Sequence[str] = (),
        op_types: Sequence[str] | None = None,
        reduce_range: bool = False,
    ) -> None:
        super().__init__()
        self.ranges = Path(ranges)
        self.per_channel = per_channel
        self.symmetric_activations = symmetric_activations
        self.exclude_nodes = tuple(exclude_nodes)
        self.only_nodes = tuple(only_nodes)  # when set, quantise these nodes and nothing else
        self.op_types = list(op_types) if op_types else None
        self.reduce_range = reduce_range
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.calibrate import load_tensors_data

        proto = ir.serde.serialize_model(model)
        renamed = _rename_clashing_initializers(proto)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        per_channel = self.per_channel and opset >= 13  # per-channel Q/DQ (their axis) needs opset 13
        method = load_tensors_data(self.ranges).calibration_method
        activation = QuantType.QInt8 if self.symmetric_activations else QuantType.QUInt8
        adjusted_bias = True

        def quantize(out: Path, adjust: bool) -> None:
            quantize_static(
                proto, out, None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=activation, weight_type=QuantType.QInt8,
                nodes_to_exclude=list(self.exclude_nodes),
                nodes_to_quantize=list(self.only_nodes) or None,
                op_types_to_quantize=self.op_types,
                calibrate_method=method, calibration_cache_path=self.ranges,
                reduce_range=self.reduce_range,
                extra_options={"ActivationSymmetric": self.symmetric_activations,
                               "WeightSymmetric": True, "QDQDisableWeightAdjustForInt32Bias": not adjust},
            )

        def quantize_adjusting_if_it_can(out: Path) -> None:
            nonlocal adjusted_bias
            try:
                quantize(out, adjust=True)
            except ValueError as exc:
                # ORT's weight-scale adjustment for int32 biases compares a per-channel array as a scalar
                # (magika's int32-input classifier): quantise without that adjustment
                if "truth value of an array" not in str(exc):
                    raise
                adjusted_bias = False
                quantize(out, adjust=False)

        quantized = quantise_to_proto(quantize_adjusting_if_it_can, "INT8 quantisation")
        restored = _restore_outer_scope(quantized, proto)
        result = ir.serde.deserialize_model(quantized)
        n_quant = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear")
        if n_quant == 0 and not self.exclude_nodes:  # silero-vad: every op it could take sits in an If branch, which stays float
            raise CompileError("INT8 quantised nothing: no op of the main graph could take INT8"
                               + (f" ({restored} If/Loop subgraph(s) stay float)" if restored else ""))
        self.note = (f"{n_quant} DequantizeLinear, {len(self.exclude_nodes)} node(s) kept in float"
                     + ("" if per_channel or not self.per_channel else f"; per-tensor weights (opset {opset} < 13)")
                     + ("; 7-bit weights" if self.reduce_range else "")
                     + ("" if adjusted_bias else "; weight scales not adjusted for int32 biases (ORT's adjustment "
                                                 "failed on this model)")
                     + (f"; renamed {renamed} initializer(s) whose names the quantiser reserves" if renamed else "")
                     + (f"; {restored} subgraph(s) kept in float" if restored else ""))
        return ir.passes.PassResult(result, True)


# ONNX Runtime names the scale of tensor T "T_scale" (and "T_zero_point", ...) and silently
# reuses an initializer that already has that name: a constant called "att_scale" became the
# quantisation scale of tensor "att" (cosine 0.9998 -> 0.9887, no error).
_RESERVED_SUFFIXES = ("_scale", "_zero_point", "_quantized", "_QuantizeLinear_Output", "_DequantizeLinear_Output")


def _rename_clashing_initializers(proto: onnx.ModelProto) -> int:
    """Rename initializers (never activations: the calibration table is keyed by their names)
    whose names the quantiser would generate for some tensor of the graph."""
    graph = proto.graph
    tensors = {name for node in graph.node for name in (*node.input, *node.output) if name}
    tensors |= {i.name for i in graph.input}
    reserved = {t + suffix for t in tensors for suffix in _RESERVED_SUFFIXES}
    taken = tensors | {i.name for i in graph.initializer}
    protected = {o.name for o in graph.output} | {i.name for i in graph.input}
    mapping = {}
    for init in graph.initializer:
        if init.name in reserved and init.name not in protected:
            new, k = f"{init.name}_const", 0
            while new in taken or new in reserved:
                k += 1
                new = f"{init.name}_const{k}"
            taken.add(new)
            mapping[init.name] = new
            init.name = new
    if mapping:
        for node in _nodes_deep(graph):  # subgraphs read outer-scope initializers by name too
            node.input[:] = [mapping.get(name, name) for name in node.input]
    return len(mapping)


def _nodes_deep(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _nodes_deep(sub)


def _restore_outer_scope(quantized: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """Make the main graph valid again for the subgraphs it holds; returns how many subgraph nodes there are.

    A float initializer that only a subgraph still reads is put back (the quantiser drops
    a weight's float copy once it has quantised it), then the main graph is sorted
    topologically with each node's outer-scope reads counted as inputs, keeping the
    quantiser's order wherever it was already valid.
    """
    graph = quantized.graph
    holders = [n for n in graph.node if subgraphs(n)]
    if not holders:
        return 0
    needed = set().union(*(outer_reads(g) for n in holders for g in subgraphs(n)))
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    available |= {o for n in graph.node for o in n.output}
    floats = {i.name: i for i in original.graph.initializer}
    for name in sorted(needed - available):
        if name in floats:
            graph.initializer.append(floats[name])
    sort_with_outer_reads(graph)
    return len(holders)
