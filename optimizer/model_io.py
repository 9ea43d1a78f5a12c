"""Reading and writing ONNX models with checks that turn bad input into clear errors."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from dlopt.errors import ModelError, first_line

logger = logging.getLogger(__name__)

# Protobuf refuses to serialise one message over 2 GiB; stay well under it.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    """Refuse external-data locations that escape the model's folder (path traversal)."""
    root = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
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
    _check_external_locations(proto, path.parent)
    check_opsets(proto, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{path} fails onnx.checker: {first_line(exc)}") from exc
    check_ops_known(proto, str(path))
    return proto


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


def check_proto(proto: onnx.ModelProto) -> None:
    """Validate an in-memory model (Python API users hand these over)."""
    if not isinstance(proto, onnx.ModelProto):
        raise ModelError(f"expected an onnx.ModelProto or a path, got {type(proto).__name__}")
    check_opsets(proto, "model")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"model fails onnx.checker: {first_line(exc)}") from exc
    check_ops_known(proto, "model")


def load_ir(path: Path) -> ir.Model:
    """Load a validated model file into onnx-ir (external data is read lazily)."""
    try:
        return ir.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load {path}: {first_line(exc)}") from exc


def initializer_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save_ir(model: ir.Model, path: Path) -> list[Path]:
    """Save ``model`` to ``path``; large weights go to ``<name>.data`` beside it.

    Returns every file written so callers can hash and size the artefact.
    """
    if initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        data_name = path.name + ".data"
        ir.save(model, str(path), external_data=data_name)
        return [path, path.with_name(data_name)]
    ir.save(model, str(path))
    return [path]


def model_size_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)
