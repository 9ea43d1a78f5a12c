"""QuantizeWeightOnlyPass: a decoder's MatMul weights to INT8 or INT4 blocks (ONNX Runtime's MatMulNBits).

Weight-only quantisation stores each constant MatMul weight [K, N] as ``bits``-bit integers with one float
scale (and, asymmetric, one zero point) per ``block_size`` values along K; activations stay float.  A small
decoder's decode step reads every weight once per token, so it runs at the speed weights stream from memory:
that is what makes 8 and 4 bits fast on CPUs.  ``accuracy_level=4`` lets ORT quantise the activations to int8
inside MatMulNBits too (the VNNI path, several times faster, but it flips near-tie greedy tokens on some
models: microsoft/onnxruntime#29849), so it is an option of its own, judged by greedy agreement.  Measured with
ORT 1.32 on a SmolLM2-135M-shaped decoder, 1 thread: INT8 without it decodes 8x slower than float (3 vs 27
tokens/s), INT8 with it 2.4x faster; INT4 1.9x without, 2.5x with.  Perplexity of SmolLM2-135M (GPL-3, 4k
tokens, against its dequantised-Q4_1 float32): INT8 block 32 +0.05 % (+0.46 % with accuracy_level 4); INT4 block
32 +33 % with the head at 4 bits, +23 % with the head at 8 bits (``head=False``, then a second pass at 8 bits).

Guarantees:
- the input model is unchanged (ORT's quantiser edits the proto it is given: it gets a serialised copy);
- every MatMul whose weight is a 2-D float initializer, or a ``Transpose`` of one that nothing else reads (how
  torch's exporter writes every ``nn.Linear``: the weight is stored once, transposed, under its own name),
  becomes ``com.microsoft.MatMulNBits`` with ``bits`` and ``block_size``, except the head (the node producing
  ``output``) when ``head=False``;
- a head reading ``Transpose(E)`` of the embedding table E is left in float with that reason (tied
  embeddings: run ``UntieLmHeadPass`` first to quantise it);
- ``embedding=True`` (4 bits only) turns the Gather of each 2-D float initializer table into
  ``com.microsoft.GatherBlockQuantized`` (blocks along the hidden axis); that op's int4 tensors need opset 21
  and IR 10, which the model is moved to (a model with GroupNormalization, whose meaning changed at opset 21,
  keeps its Gather float);
- ``summary`` and ``note`` say how many MatMuls were quantised, which with a constant weight (and which
  embedding Gathers asked for) were not and why, and the initializer bytes before and after; ORT's log lines go
  to debug logging.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx_ir as ir
from dlopt.core.errors import CompileError, ConfigError, first_line
from dlopt.passes._names import unique_name
from dlopt.passes._ort_quant import quiet

logger = logging.getLogger("dlopt.quantization")

_FLOATS = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16
_DEFAULT = ("", "ai.onnx")


@dataclass(frozen=True)
class WeightOnlySummary:
    """What :class:`QuantizeWeightOnlyPass` did to one model."""

    quantised: tuple[str, ...]         # MatMul node names, now MatMulNBits
    left: tuple[tuple[str, str], ...]  # (node, why): MatMuls with a constant weight, Gathers asked for, kept float
    activation_matmuls: int            # MatMuls of two computed values (attention scores): nothing to quantise
    gathers: tuple[str, ...]           # Gather node names, now GatherBlockQuantized
    transposes_folded: int             # Transpose(weight) stored transposed instead
    bytes_before: int                  # initializer bytes
    bytes_after: int


class QuantizeWeightOnlyPass(ir.passes.FunctionalPass):
    """ONNX Runtime's block-wise weight-only quantisation of MatMul weights (see the module's guarantees).

    ``bits``: 8 or 4; ``block_size``: a power of two, 16 or more (K is padded up to a whole block);
    ``symmetric``: no zero points; ``accuracy_level``: None (float activations) or 4 (int8 activations);
    ``head``: quantise the MatMul producing ``output`` too (False keeps it float); ``embedding``: also the
    embedding Gather, as 4-bit GatherBlockQuantized.
    """

    def __init__(self, *, bits: int = 8, block_size: int = 32, symmetric: bool = True,
                 accuracy_level: int | None = None, head: bool = True, embedding: bool = False,
                 output: str = "logits") -> None:
        super().__init__()
        check_options(bits=bits, block_size=block_size, accuracy_level=accuracy_level, embedding=embedding)
        self.bits, self.block_size, self.symmetric = bits, block_size, bool(symmetric)
        self.accuracy_level, self.output = accuracy_level, output
        self.head, self.embedding = bool(head), bool(embedding)
        self.summary: WeightOnlySummary | None = None
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        quantizer_module = _import_quantizer()
        proto = _serialise(model)  # our own copy: ORT's quantiser edits the proto in place
        graph = proto.graph
        folded = _fold_transposed_weights(graph)
        plan = _plan(graph, head=self.head, embedding=self.embedding, output=self.output)
        if self.embedding and plan.gathers:
            opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT), 0)
            if opset < 21 and any(n.op_type == "GroupNormalization" for n in graph.node):
                plan.skip_gathers(f"GroupNormalization changes meaning at opset 21, which GatherBlockQuantized "
                                  f"needs (the model is opset {opset})")
        config = quantizer_module.DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=self.symmetric, accuracy_level=self.accuracy_level,
            bits=self.bits,  # inside the config: with algo_config given, the quantiser ignores its own bits=
            op_types_to_quantize=("MatMul", "Gather") if plan.gathers else ("MatMul",))
        try:
            with quiet(), _ort_log_to_debug(quantizer_module.logger):
                quantizer = quantizer_module.MatMulNBitsQuantizer(
                    proto, nodes_to_exclude=sorted(plan.excluded), algo_config=config)
                quantizer.process()
        except Exception as exc:
            raise CompileError(f"weight-only INT{self.bits} quantisation failed: {first_line(exc)}") from exc
        result = quantizer.model.model
        kinds = {n.name: n.op_type for n in result.graph.node}
        quantised = tuple(n for n in plan.weights if kinds.get(f"{n}_Q{self.bits}") == "MatMulNBits")
        left = tuple((n, plan.why.get(n, "ONNX Runtime's quantiser kept it (see debug log)"))
                     for n in plan.weights if n not in quantised)
        gathers = tuple(n for n in plan.gathers if kinds.get(f"{n}_Q4") == "GatherBlockQuantized")
        left += tuple((n, "ONNX Runtime's quantiser kept it (see debug log)") for n in plan.gathers if n not in gathers)
        left += tuple(plan.gathers_left)
        out = ir.serde.deserialize_model(result)
        self.summary = WeightOnlySummary(quantised, left, plan.activation_matmuls, gathers, folded,
                                         _initializer_bytes(model), _initializer_bytes(out))
        self.note = describe(self.summary, self)
        if self.embedding and not plan.gathers and not plan.gathers_left:
            self.note += "; no Gather reads a 2-D float initializer: no embedding to quantise"
        return ir.passes.PassResult(out, modified=bool(quantised or gathers or folded))


def check_options(*, bits, block_size, accuracy_level, embedding) -> None:
    """ConfigError in one line for options ORT's MatMulNBits cannot take."""
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ConfigError(f"weight-only bits must be 8 or 4, not {bits!r}")
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16
            or block_size & (block_size - 1)):
        raise ConfigError(f"weight-only block size must be a power of two, 16 or more (16, 32, 64, 128 ...), "
                          f"not {block_size!r}")
    if accuracy_level is not None and (isinstance(accuracy_level, bool) or accuracy_level != 4):
        raise ConfigError(f"weight-only accuracy_level must be None (float activations) or 4 (int8 activations), "
                          f"not {accuracy_level!r}")
    if embedding and bits != 4:
        raise ConfigError(f"the embedding Gather is quantised to 4 bits only (GatherBlockQuantized), not {bits}: "
                          "use bits=4 or embedding=False")


def describe(summary: WeightOnlySummary, options: QuantizeWeightOnlyPass) -> str:
    """The pass's note: one line for the report."""
    recipe = (f"INT{options.bits} block {options.block_size} {'sym' if options.symmetric else 'asym'}"
              + (f" accuracy_level {options.accuracy_level}" if options.accuracy_level else ""))
    text = f"{len(summary.quantised)} MatMul(s) -> MatMulNBits {recipe}"
    if summary.gathers:
        text += f", {len(summary.gathers)} Gather(s) -> GatherBlockQuantized INT4 (opset 21)"
    if summary.left:
        text += "; left in float: " + ", ".join(f"{name} ({why})" for name, why in summary.left)
    if summary.activation_matmuls:
        text += f"; {summary.activation_matmuls} MatMul(s) of two activations"
    return text + f"; initializers {summary.bytes_before / 1e6:.1f} MB -> {summary.bytes_after / 1e6:.1f} MB"


def _import_quantizer():
    """onnxruntime.quantization.matmul_nbits_quantizer, without its import-time ``logging.basicConfig(INFO)``
    (which would leave a handler on the root logger printing every INFO line of every library)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return matmul_nbits_quantizer


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.debug("onnxruntime.quantization: %s", record.getMessage())


@contextlib.contextmanager
def _ort_log_to_debug(ort_logger: logging.Logger) -> Iterator[None]:
    """The quantiser logs a line per node at INFO and warns of the opset-21 move: keep them as debug logs."""
    handlers, propagate, level = list(ort_logger.handlers), ort_logger.propagate, ort_logger.level
    ort_logger.handlers[:] = [_ToDebug()]
    ort_logger.propagate = False
    ort_logger.setLevel(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    try:
        yield
    finally:
        ort_logger.handlers[:] = handlers
        ort_logger.propagate, ort_logger.level = propagate, level


def _serialise(model: ir.Model):
    """A ModelProto of ``model`` with every initializer's bytes inside (external ones read in)."""
    proto = ir.serde.serialize_model(model)
    initializers = model.graph.initializers
    for tensor in proto.graph.initializer:
        if tensor.data_location == tensor.EXTERNAL:
            tensor.raw_data = initializers[tensor.name].const_value.tobytes()
            del tensor.external_data[:]
            tensor.data_location = tensor.DEFAULT
    return proto


def _readers(graph) -> dict[str, list]:
    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    return readers


def _fold_transposed_weights(graph) -> int:
    """Store each ``Transpose(W)`` that only MatMul weight inputs read as W transposed, under W's name.

    Only where W is a 2-D float initializer read by nothing else: a table the embedding Gather reads too stays
    as it is (that is a tied head, for UntieLmHeadPass)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    readers = _readers(graph)
    folded = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.domain not in _DEFAULT or len(node.input) != 1:
            continue
        weight, out = node.input[0], node.output[0]
        tensor = initializers.get(weight)
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        if (tensor is None or weight in inputs or len(tensor.dims) != 2 or perm != [1, 0]
                or tensor.data_type not in _FLOATS or len(readers[weight]) != 1 or out in outputs
                or not readers[out] or not all(_reads_as_weight(r, out) for r in readers[out])):
            continue
        transposed = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tensor).T), weight)
        tensor.CopyFrom(transposed)
        for reader in readers[out]:
            reader.input[1] = weight
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    gone = {n.output[0] for n in folded}
    for info in [v for v in graph.value_info if v.name in gone]:
        graph.value_info.remove(info)
    return len(folded)


def _reads_as_weight(node, name: str) -> bool:
    """Whether ``node`` is a MatMul reading ``name`` as its weight (input 1) only."""
    return (node.op_type == "MatMul" and node.domain in _DEFAULT and list(node.input[1:]) == [name]
            and node.input[0] != name)


class _Plan:
    """Which MatMuls hold a constant weight, which of them stay float and why, which Gathers to quantise."""

    def __init__(self) -> None:
        self.weights: list[str] = []
        self.why: dict[str, str] = {}
        self.excluded: set[str] = set()
        self.gathers: list[str] = []
        self.gathers_left: list[tuple[str, str]] = []
        self.activation_matmuls = 0

    def keep(self, name: str, why: str) -> None:
        self.why[name] = why
        self.excluded.add(name)

    def skip_gathers(self, why: str) -> None:
        self.gathers_left += [(name, why) for name in self.gathers]
        self.excluded.update(self.gathers)
        self.gathers = []


def _plan(graph, *, head: bool, embedding: bool, output: str) -> _Plan:
    plan = _Plan()
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    producers = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    taken = {n.name for n in graph.node}
    for index, node in enumerate(graph.node):
        # ORT excludes nodes by name: an unnamed node would match every other unnamed one
        if node.op_type in ("MatMul", "Gather") and not node.name:
            node.name = unique_name(f"{node.op_type}_{index}", taken)
            taken.add(node.name)
    head_node = producers.get(output) if output in {o.name for o in graph.output} else None
    for node in graph.node:
        if node.domain not in _DEFAULT:
            continue
        if node.op_type == "Gather":
            table = initializers.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if table is None or node.input[0] in inputs:
                continue
            if embedding and len(table.dims) == 2 and table.data_type in _FLOATS and axis == 0:
                plan.gathers.append(node.name)
            else:  # ORT would try every Gather of a constant, a 1-D index table included
                plan.excluded.add(node.name)
            continue
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        weight = node.input[1]
        source = producers.get(weight)
        if weight in initializers and weight not in inputs:
            plan.weights.append(node.name)
            dims, dtype = list(initializers[weight].dims), initializers[weight].data_type
            if len(dims) < 2 or any(d != 1 for d in dims[:-2]) or dtype not in _FLOATS:
                plan.why[node.name] = (f"weight {dims} {ir.DataType(dtype).name}: MatMulNBits takes 2-D float "
                                       "weights")
        elif (source is not None and source.op_type == "Transpose" and source.input[0] in initializers
              and source.input[0] not in inputs):
            plan.weights.append(node.name)
            shared = [r for r in readers[source.input[0]] if r is not source]
            plan.keep(node.name, f"weight is Transpose({source.input[0]}), " + (
                f"a table {shared[0].op_type} {shared[0].name} also reads (tied embeddings: run UntieLmHeadPass "
                "first)" if shared else "not foldable (not 2-D, another perm, or read by more than MatMul weights)"))
            continue
        else:
            plan.activation_matmuls += 1
            continue
        if node is head_node and not head:
            plan.keep(node.name, "the head, kept float (head=False)")
    return plan


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
