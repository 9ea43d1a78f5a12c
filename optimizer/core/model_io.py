"""Reading and writing ONNX models with checks that turn bad input into clear errors."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import stat
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from dlopt.core.artifacts import sha256_file  # noqa: F401 - where driver and write find it
from dlopt.core.errors import ModelError, first_line

logger = logging.getLogger(__name__)

# Protobuf refuses to serialise one message over 2 GiB; stay well under it.
EXTERNAL_DATA_THRESHOLD = 1 << 30



def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _attribute_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for each in _graphs(graph):
        for node in each.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers and node attributes, subgraphs included."""
    for each in _graphs(graph):
        yield from each.initializer
    yield from _attribute_tensors(graph)


def _external_tensors(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, dict[str, str]]]:
    for tensor in _graph_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, {entry.key: entry.value for entry in tensor.external_data}


def _external_bytes(proto: onnx.ModelProto) -> int:
    """Bytes the model keeps in external data files (from the tensors' lengths or shapes)."""
    total = 0
    for tensor, info in _external_tensors(proto):
        if "length" in info:
            total += int(info["length"])
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 8  # an unusual dtype: overestimating only keeps more of it on disk
        total += math.prod(tensor.dims) * itemsize
    return total


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    """Refuse external-data locations that escape the model's folder (path traversal)."""
    root = base.resolve()
    for tensor, info in _external_tensors(proto):
        location = info.get("location", "")
        target = (root / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(root):
            raise ModelError(
                f"tensor {tensor.name!r} points its external data at {location!r}, outside "
                f"the model's folder {root}; refusing to read it"
            )
        if not target.is_file():
            raise ModelError(
                f"tensor {tensor.name!r} needs external data file {location!r}, "
                f"which is missing next to the model"
            )


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse and validate an ONNX file; every failure becomes a one-line ModelError."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"expected an .onnx file, got a directory: {path}")
    # stat, never open, before knowing it is a regular file: opening a FIFO or a device blocks or reads forever.
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ModelError(f"{path} is not a regular file (a {_file_kind(mode)}); give an .onnx file")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"model file is empty (0 bytes): {path}")
    with open(path, "rb") as fh:
        head = fh.read(1)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError or ValueError
        # A serialised ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
        if head == b"\x08":
            raise ModelError(
                f"{path} is a truncated or corrupt ONNX file ({first_line(exc)})"
            ) from exc
        raise ModelError(f"{path} is not an ONNX model (protobuf parse failed)") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelError(f"{path} is not an ONNX model (no ir_version or graph)")
    name_negative_dims(proto)
    check_interface(proto, str(path))
    _check_external_locations(proto, path.parent)
    check_opsets(proto, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{path} fails onnx.checker: {first_line(exc)}") from exc
    check_ops_known(proto, str(path))
    return proto


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "pipe"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


# What a graph input or output can be besides a tensor (onnx.TypeProto's "value" oneof).
_VALUE_KINDS = {"sequence_type": "a sequence", "map_type": "a map", "optional_type": "an optional",
                "sparse_tensor_type": "a sparse tensor", "opaque_type": "an opaque value",
                None: "a value without a type"}


def _shape_text(value: onnx.ValueInfoProto) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def negative_dim_names(proto: onnx.ModelProto) -> dict[tuple[str, int], str]:
    """The symbolic name each negative dim_value of a graph input or output gets.

    Paddle's exporter writes unknown sizes as ``-1`` (an ONNX ``dim_value`` must be >= 0) or
    as the symbolic name ``?`` on every unknown axis (which ONNX would read as one size shared
    by all of them): axis 0 is the batch in Paddle's convention, so every such dim there shares
    the name ``batch``; any other axis gets its own ``<value>_d<axis>``.  Names already in the
    graph are never reused."""
    graph = proto.graph
    taken = {d.dim_param for v in (*graph.input, *graph.output) for d in v.type.tensor_type.shape.dim
             if d.dim_param and d.dim_param != "?"}

    def fresh(name: str) -> str:
        candidate, n = name, 1
        while candidate in taken:
            candidate, n = f"{name}_{n}", n + 1
        return candidate

    batch, names = None, {}
    for value in (*graph.input, *graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if (dim.HasField("dim_value") and dim.dim_value < 0) or dim.dim_param == "?":
                if axis == 0:
                    batch = batch or fresh("batch")
                    names[value.name, axis] = batch
                else:
                    names[value.name, axis] = fresh(re.sub(r"\W", "_", value.name) + f"_d{axis}")
                    taken.add(names[value.name, axis])
    return names


def name_negative_dims(proto: onnx.ModelProto) -> int:
    """Replace negative dim_values and ``?`` dims of graph inputs and outputs by symbolic dims, in place
    (see negative_dim_names); returns how many were renamed."""
    names = negative_dim_names(proto)
    for value in (*proto.graph.input, *proto.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if (value.name, axis) in names:
                dim.dim_param = names[value.name, axis]  # the oneof clears dim_value
    return len(names)


def with_named_dims(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` itself, or a copy with its negative dims named: a caller's proto stays as given."""
    if not negative_dim_names(proto):
        return proto
    named = onnx.ModelProto()
    named.CopyFrom(proto)
    name_negative_dims(named)
    return named


def check_interface(proto: onnx.ModelProto, where: str) -> None:
    """Refuse graphs dlopt cannot feed or compare: no inputs or outputs, non-tensor or empty ones."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if not inputs:
        raise ModelError(f"{where} has no inputs; dlopt optimises models that take at least one input tensor")
    if not graph.output:
        raise ModelError(f"{where} has no outputs; a model must return at least one tensor")
    for role, values in (("input", inputs), ("output", graph.output)):
        for value in values:
            kind = value.type.WhichOneof("value")
            if kind != "tensor_type":
                raise ModelError(f"{where}: {role} {value.name!r} is {_VALUE_KINDS.get(kind, kind)}; "
                                 f"dlopt handles tensor inputs and outputs only")
    for value in inputs:
        sizes = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(size <= 0 for size in sizes):
            what = "zero-size" if 0 in sizes else "negative"
            raise ModelError(f"{where}: input {value.name!r} has a {what} dimension (shape {_shape_text(value)}); "
                             f"dlopt cannot feed an empty tensor, export with positive or symbolic sizes")


# Domains whose ops run without an ONNX schema: ONNX Runtime's contrib ops.
RUNTIME_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc")


@functools.lru_cache(maxsize=1)
def _newest_opsets() -> dict[str, int]:
    newest: dict[str, int] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        newest[schema.domain] = max(newest.get(schema.domain, 0), schema.since_version)
    newest[""] = newest["ai.onnx"] = onnx.defs.onnx_opset_version()
    return newest


def check_opsets(proto: onnx.ModelProto, where: str) -> None:
    """Refuse opsets newer than the installed onnx knows: their ops cannot be checked or converted."""
    newest = _newest_opsets()
    for opset in proto.opset_import:
        limit = newest.get(opset.domain)
        if limit is not None and opset.version > limit:
            domain = opset.domain or "ai.onnx"
            raise ModelError(
                f"{where} uses {domain} opset {opset.version}, newer than the {limit} the installed onnx "
                f"{onnx.__version__} supports; upgrade onnx or export with opset <= {limit}"
            )


def check_ops_known(proto: onnx.ModelProto, where: str) -> None:
    """Refuse ops that neither ONNX, ONNX Runtime's contrib set nor the model's own functions define."""
    functions = {(f.domain, f.name) for f in proto.functions}
    unknown = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = node.domain or ""
            if (domain, node.op_type) in functions or domain in RUNTIME_DOMAINS:
                pass
            elif not onnx.defs.has(node.op_type, domain):
                unknown.add(f"{domain}.{node.op_type}" if domain else node.op_type)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(proto.graph)
    if unknown:
        raise ModelError(
            f"{where} uses ops no ONNX schema or runtime defines: {', '.join(sorted(unknown))} "
            f"(custom ops need their own runtime library)"
        )


def decode_model_bytes(data: bytes | bytearray | memoryview) -> onnx.ModelProto:
    """A serialised ModelProto, parsed; ModelError when the bytes are not one."""
    try:
        return onnx.load_model_from_string(bytes(data))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"the bytes given as model are not a serialised ONNX model ({first_line(exc)})") from exc


def check_proto(proto: onnx.ModelProto, *, interface: bool = True) -> None:
    """Validate an in-memory model (Python API users hand these over).

    ``interface=False`` accepts what only a caller that feeds the model itself can run (no inputs,
    sequence inputs, empty tensors: the ONNX backend API's models)."""
    if not isinstance(proto, onnx.ModelProto):
        raise ModelError(f"expected an onnx.ModelProto or a path, got {type(proto).__name__}")
    if interface:
        check_interface(proto, "model")
    check_opsets(proto, "model")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"model fails onnx.checker: {first_line(exc)}") from exc
    check_ops_known(proto, "model")


def load_ir(path: Path) -> ir.Model:
    """Load a validated model file into onnx-ir, self-contained whatever the working directory.

    External data under ``EXTERNAL_DATA_THRESHOLD`` is read into memory, so every later
    serialisation (onnxsim, quantisation, a backend's model file) carries its weights
    and works from any folder.  Larger weights stay in their files, read lazily from the
    model's absolute folder; tensors inside node attributes are always read (they are
    small and onnx-ir only writes initializers to new external data files).
    """
    path = Path(path)
    base = path.parent.resolve()
    try:
        proto = onnx.load(str(path), load_external_data=False)
        name_negative_dims(proto)
        if _external_bytes(proto) < EXTERNAL_DATA_THRESHOLD:
            onnx.load_external_data_for_model(proto, str(base))
        else:
            _load_attribute_tensors(proto, base)
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelError(f"cannot load {path}: {first_line(exc)}") from exc
    ir.external_data.set_base_dir(model.graph, base)
    return model


def _load_attribute_tensors(proto: onnx.ModelProto, base: Path) -> None:
    for tensor in _attribute_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]


def has_external_tensors(model: ir.Model) -> bool:
    """Whether some initializer still reads its data from a file."""
    return any(isinstance(value.const_value, ir.ExternalTensor)
               for graph in model.graphs() for value in graph.initializers.values())


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save_ir(model: ir.Model, path: Path, *, external: bool = False) -> list[Path]:
    """Save ``model`` to ``path``; large weights (all of them with ``external``) go to ``<name>.data`` beside it.

    Weights still read from another model's data file are copied into the new one:
    a saved model never points at files outside its folder.  Returns every file
    written so callers can hash and size the artefact.
    """
    if external or initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD or has_external_tensors(model):
        data_name = path.name + ".data"
        ir.save(model, str(path), external_data=data_name)
        return [path, path.with_name(data_name)]
    ir.save(model, str(path))
    return [path]
