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
- the input model is unchanged: the pass works on ``model.clone()`` (the same tensors, new nodes), and holds
  one weight in float at a time, quantised by ONNX Runtime's own blockwise kernels; an external weight's
  memory map is released once it is quantised (mapped again if read again);
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
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from dlopt.core.errors import CompileError, ConfigError, first_line
from dlopt.passes._names import unique_name
from dlopt.passes._ort_quant import quiet

logger = logging.getLogger("dlopt.quantization")

_FLOATS = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
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
        out = model.clone()  # the same tensors, new nodes and values: the input model stays as it was
        before = _initializer_bytes(model)
        graph = out.graph
        plan = _plan_matmuls(graph, head=self.head, output=self.output)
        quantised: list[str] = []
        try:
            for item in plan.weights:
                if item.why is None:
                    _replace_with_matmulnbits(graph, item, self)
                    quantised.append(item.name)
        except Exception as exc:
            raise CompileError(f"weight-only INT{self.bits} quantisation failed: {first_line(exc)}") from exc
        # a Transpose(W) weight is stored transposed: quantised (MatMulNBits reads [N, K] blocks), or in float
        folded = sum(1 for i in plan.weights if i.why is None and i.transposed) + _fold_transposes_left(graph, plan)
        left = tuple((i.name, i.why) for i in plan.weights if i.why is not None)
        gathers: tuple[str, ...] = ()
        tables = True
        if self.embedding:
            out, gathers, gathers_left = _quantise_embeddings(out, self)
            left += gathers_left
            tables = bool(gathers or gathers_left)
        self.summary = WeightOnlySummary(tuple(quantised), left, plan.activation_matmuls, gathers, folded,
                                         before, _initializer_bytes(out))
        self.note = describe(self.summary, self)
        if not tables:
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


def _constant(value: ir.Value | None) -> bool:
    return (value is not None and value.is_initializer() and not value.is_graph_input()
            and value.const_value is not None)


@dataclass
class _Weight:
    """A MatMul with a constant weight: ``table`` (read as it is, or through a Transpose); ``why`` it stays
    float (None: it is quantised); ``foldable``: its Transpose can be stored transposed instead."""

    name: str
    node: ir.Node
    table: ir.Value
    transposed: bool
    why: str | None = None
    foldable: bool = False


@dataclass
class _Plan:
    weights: list[_Weight]
    activation_matmuls: int


def _plan_matmuls(graph: ir.Graph, *, head: bool, output: str) -> _Plan:
    """Every MatMul of ``graph`` with a constant weight, and why each that stays float does (names unnamed ones)."""
    taken = {n.name for n in graph if n.name}
    for index, node in enumerate(graph):
        if node.op_type in ("MatMul", "Gather") and node.domain in _DEFAULT and not node.name:
            node.name = unique_name(f"{node.op_type}_{index}", taken)
            taken.add(node.name)
    head_node = next((v.producer() for v in graph.outputs if v.name == output), None)
    plan = _Plan([], 0)
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in _DEFAULT or len(node.inputs) != 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        source = weight.producer()
        if _constant(weight):
            item = _Weight(node.name, node, weight, False)
            shape, dtype = list(weight.const_value.shape), weight.dtype
            if len(shape) != 2 or dtype not in _FLOAT_TYPES:
                item.why = f"weight {shape} {dtype.name}: MatMulNBits takes 2-D float weights"
        elif (source is not None and source.op_type == "Transpose" and source.domain in _DEFAULT
              and len(source.inputs) == 1 and _constant(source.inputs[0])):
            table = source.inputs[0]
            item = _Weight(node.name, node, table, True, foldable=_foldable(source, graph))
            shared = [u.node for u in table.uses() if u.node is not source]
            if shared:
                item.why = (f"weight is Transpose({table.name}), a table {shared[0].op_type} {shared[0].name} also "
                            "reads (tied embeddings: run UntieLmHeadPass first)")
            elif not item.foldable:
                item.why = (f"weight is Transpose({table.name}), not foldable (not 2-D, another perm, or read by "
                            "more than MatMul weights)")
        else:
            plan.activation_matmuls += 1
            continue
        if item.why is None and node is head_node and not head:
            item.why = "the head, kept float (head=False)"
        plan.weights.append(item)
    return plan


def _foldable(transpose: ir.Node, graph: ir.Graph) -> bool:
    """Whether ``Transpose(W)`` of a 2-D float W that nothing else reads feeds only MatMul weight inputs."""
    table, out = transpose.inputs[0], transpose.outputs[0]
    perm = transpose.attributes.get("perm")
    return ((perm is None or list(perm.as_ints()) == [1, 0]) and len(table.const_value.shape) == 2
            and table.dtype in _FLOAT_TYPES and len(table.uses()) == 1 and not out.is_graph_output()
            and bool(out.uses()) and all(u.node.op_type == "MatMul" and u.node.domain in _DEFAULT and u.idx == 1
                                         and u.node.inputs[0] is not out for u in out.uses()))


def _add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = unique_name(base, set(graph.initializers))
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _drop_if_unread(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the initializer ``value`` (or the Transpose producing it, then its table) once nothing reads it."""
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:
        table = producer.inputs[0]
        graph.remove(producer, safe=True)
        _drop_if_unread(graph, table)
    elif value.is_initializer() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _replace_with_matmulnbits(graph: ir.Graph, item: _Weight, options: QuantizeWeightOnlyPass) -> None:
    """``item``'s MatMul as MatMulNBits: its weight quantised one block of K at a time by ONNX Runtime's own
    kernels (the ones its quantiser calls), one weight in memory at a time."""
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_4bits,
        quantize_matmul_8bits,
    )

    tensor = item.table.const_value
    array = tensor.numpy()
    kind = array.dtype
    if item.transposed:
        array = array.T
    weight = np.ascontiguousarray(array, dtype=np.float16 if kind == np.float16 else np.float32)
    del array
    bits, block = options.bits, options.block_size
    rows, cols = weight.shape
    blocks, per_byte = -(-rows // block), 8 // bits
    if blocks * block != rows:
        weight = np.pad(weight, ((0, blocks * block - rows), (0, 0)))
    packed = np.zeros((cols, blocks, block // per_byte), np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((cols, blocks), weight.dtype)
    (quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits)(
        packed, weight, scales, zero_points, block, cols, rows, options.symmetric)
    del weight
    if isinstance(tensor, ir.ExternalTensor):  # unmap its pages (mapped anew if anything reads it again)
        with contextlib.suppress(BufferError):  # someone still holds an array of it: it stays mapped
            tensor.release()
    if kind not in (np.float16, np.float32):  # bfloat16: the scales keep the activations' type
        scales = scales.astype(kind)
    node, base = item.node, item.table.name
    inputs = [node.inputs[0], _add_initializer(graph, f"{base}_Q{bits}", packed),
              _add_initializer(graph, f"{base}_scales", scales)]
    if not options.symmetric:
        inputs.append(_add_initializer(graph, f"{base}_zero_points", zero_points))
    attributes = {"K": rows, "N": cols, "bits": bits, "block_size": block}
    if options.accuracy_level is not None:
        attributes["accuracy_level"] = options.accuracy_level
    new = ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft", name=f"{node.name}_Q{bits}")
    weight_in = node.inputs[1]
    ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
    graph.opset_imports.setdefault("com.microsoft", 1)
    _drop_if_unread(graph, weight_in)


def _fold_transposes_left(graph: ir.Graph, plan: _Plan) -> int:
    """Store the table of each foldable ``Transpose(W)`` weight that stays float as W transposed, under W's name."""
    folded = 0
    for item in plan.weights:
        transpose = item.node.inputs[1].producer() if item.transposed and item.foldable and item.why else None
        if transpose is None or transpose.graph is not graph:
            continue
        table = item.table
        array = np.ascontiguousarray(table.const_value.numpy().T)
        graph.initializers.pop(table.name)
        value = ir.Value(name=table.name, shape=ir.Shape(array.shape), type=table.type,
                         const_value=ir.Tensor(array, name=table.name))
        graph.register_initializer(value)
        for use in list(transpose.outputs[0].uses()):
            use.node.replace_input_with(use.idx, value)
        graph.remove(transpose, safe=True)
        folded += 1
    return folded


def _quantise_embeddings(model: ir.Model, options: QuantizeWeightOnlyPass):
    """The embedding Gathers of ``model`` as 4-bit GatherBlockQuantized (ONNX Runtime's quantiser, given the
    model once its MatMuls are quantised, so a small copy): (model, Gather names quantised, (name, why) left)."""
    quantizer_module = _import_quantizer()
    proto = _serialise(model)
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    gathers, excluded, left = [], {n.name for n in graph.node if n.op_type != "Gather"}, []
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in _DEFAULT:
            continue
        table = initializers.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is not None and node.input[0] not in inputs and len(table.dims) == 2
                and table.data_type in _FLOATS and axis == 0):
            gathers.append(node.name)
        else:  # ORT would try every Gather of a constant, a 1-D index table included
            excluded.add(node.name)
    opset = next((o.version for o in proto.opset_import if o.domain in _DEFAULT), 0)
    if gathers and opset < 21 and any(n.op_type == "GroupNormalization" for n in graph.node):
        why = (f"GroupNormalization changes meaning at opset 21, which GatherBlockQuantized needs (the model is "
               f"opset {opset})")
        return model, (), tuple((name, why) for name in gathers)
    if not gathers:
        return model, (), ()
    config = quantizer_module.DefaultWeightOnlyQuantConfig(
        block_size=options.block_size, is_symmetric=options.symmetric, accuracy_level=options.accuracy_level,
        bits=4, op_types_to_quantize=("Gather",))
    try:
        with quiet(), _ort_log_to_debug(quantizer_module.logger):
            quantizer = quantizer_module.MatMulNBitsQuantizer(proto, nodes_to_exclude=sorted(excluded),
                                                              algo_config=config)
            quantizer.process()
    except Exception as exc:
        raise CompileError(f"4-bit embedding quantisation failed: {first_line(exc)}") from exc
    result = quantizer.model.model
    kinds = {n.name: n.op_type for n in result.graph.node}
    done = tuple(n for n in gathers if kinds.get(f"{n}_Q4") == "GatherBlockQuantized")
    left = tuple((n, "ONNX Runtime's quantiser kept it (see debug log)") for n in gathers if n not in done)
    return ir.serde.deserialize_model(result), done, left


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


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
