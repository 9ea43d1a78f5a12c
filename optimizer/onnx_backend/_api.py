"""The ONNX backend API (``onnx.backend.base``) over dlopt's own pass and compile path.

``prepare`` checks the model as dlopt does, runs the generic fp32 passes, compiles
with the chosen backend's ``compile`` for the ``cpu`` profile and loads the artefact
with ``dlopt.targets.load``: the code ``dlopt compile`` runs, without calibration,
quantisation or timing.  Two of the generic passes are left out because they serve
other precisions or cost seconds per model: the opset upgrade (per-channel int8
needs opset 13) and onnxsim (a child process per model); fp32 outputs do not
depend on either.  A pass that fails on a model is skipped, and named in the rep's
``skipped_passes``: an optimisation is never a reason not to run a valid model.

Unlike ``dlopt compile``, a backend here is handed its inputs by the caller, so
models without inputs, with sequence inputs or with empty tensors are accepted.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx.backend.base import Backend, BackendRep

from dlopt.core.errors import ConfigError, DloptError, ModelError, first_line

logger = logging.getLogger(__name__)

DEVICE = "CPU"
PROFILE = "cpu"


def fp32_passes(model: ir.Model | None = None) -> list[ir.passes.PassBase]:
    """dlopt's generic passes for ``model`` less the opset upgrade and onnxsim (see the module docstring)."""
    from dlopt.passes import SimplifyPass, UpgradeOpsetPass, generic_passes

    return [p for p in generic_passes(model=model) if not isinstance(p, (SimplifyPass, UpgradeOpsetPass))]


def optimise(model: ir.Model) -> tuple[ir.Model, list[str]]:
    """``model`` through ``fp32_passes``; a pass that fails is skipped (its model kept) and named
    in the second value: an optimisation is never a reason not to run a valid model."""
    from dlopt.core.pipeline import run_pipeline

    skipped = []
    for pass_ in fp32_passes(model):
        try:
            model = run_pipeline(model.clone(), [pass_]).model
        except DloptError as exc:
            logger.warning("%s", exc)
            skipped.append(str(exc))
    return model, skipped


def load_model(model: onnx.ModelProto | bytes | str | os.PathLike) -> onnx.ModelProto:
    """``model`` as a checked ModelProto (a path, serialised bytes or a proto)."""
    from dlopt.core.model_io import check_proto, decode_model_bytes

    if isinstance(model, (bytes, bytearray, memoryview)):
        model = decode_model_bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        try:  # with its external data: the backend compiles it whole
            model = onnx.load(os.fspath(model))
        except Exception as exc:
            raise ModelError(f"cannot read the ONNX model {os.fspath(model)}: {first_line(exc)}") from exc
    check_proto(model, interface=False)  # the caller feeds the model itself: no inputs is fine
    return model


def check_device(device: str) -> None:
    if not DloptBackend.supports_device(device):
        raise ConfigError(f"dlopt's ONNX backends run on device 'CPU', not {device!r}")


class DloptRep(BackendRep):
    """A prepared model: ``run(inputs)`` takes arrays in graph-input order (or a dict by name).

    Outputs come back as the model declares them: a runtime that computes an output in
    another dtype (OpenVINO's i32 for i64) has it cast back.
    """

    def __init__(self, engine, proto: onnx.ModelProto, workdir: Path) -> None:
        initializers = {t.name for t in proto.graph.initializer}
        self.input_names = [v.name for v in proto.graph.input if v.name not in initializers]
        self._dtypes = [_declared_dtype(v) for v in proto.graph.output]
        self.engine = engine
        self.skipped_passes: list[str] = []  # optimisations that failed on this model (see optimise)
        self._cleanup = weakref.finalize(self, shutil.rmtree, workdir, True)

    def run(self, inputs: Any, **kwargs: Any) -> list:
        del kwargs
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            if len(inputs) != len(self.input_names):
                raise ConfigError(f"the model takes {len(self.input_names)} input(s) "
                                  f"({', '.join(self.input_names)}), {len(inputs)} were given")
            feeds = dict(zip(self.input_names, inputs))
        # the suite hands scalars over as numpy scalars, which runtimes do not take as tensors
        feeds = {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in feeds.items()}
        outputs = list(self.engine.run(feeds))
        return [_as_declared(out, dtype) for out, dtype in zip(outputs, self._dtypes)] + outputs[len(self._dtypes):]

    def close(self) -> None:
        """Remove the compiled artefacts now rather than when the rep is collected."""
        self._cleanup()


def _declared_dtype(value: onnx.ValueInfoProto) -> np.dtype | None:
    tensor = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if tensor is None or not tensor.elem_type:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _as_declared(out: Any, dtype: np.dtype | None) -> Any:
    if dtype is None or not isinstance(out, np.ndarray) or out.dtype == dtype or dtype == object:
        return out
    return out.astype(dtype)


class DloptBackend(Backend):
    """One dlopt backend as an ONNX backend; subclasses name it in ``target``."""

    target: ClassVar[str]

    @classmethod
    def engine(cls, model: ir.Model, workdir: Path, *, threads: int, lift: bool = True,
               original: ir.Model | None = None):
        from dlopt.onnx_backend.engines import engine_for

        return engine_for(cls.target, model, workdir, threads=threads, lift=lift, original=original)

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = DEVICE, **kwargs: Any) -> bool:
        from dlopt.onnx_backend.engines import unsupported

        del kwargs
        if not cls.supports_device(device):
            return False
        try:
            return not unsupported(cls.target, ir.serde.deserialize_model(load_model(model)))
        except Exception as exc:  # an unreadable model is not compatible; prepare says why
            logger.debug("%s: model not compatible: %s", cls.target, first_line(exc))
            return False

    @classmethod
    def prepare(cls, model: onnx.ModelProto | bytes | str, device: str = DEVICE, **kwargs: Any) -> DloptRep:
        """Check, optimise and compile ``model``.

        ``threads=N`` sets the runtime's thread count; ``lift=False`` leaves out what dlopt adds for
        a backend that lacks an op or needs constants (function-body expansion; for TVM, bound
        shape inputs and folded shapes), to measure what those passes gain.
        """
        check_device(device)
        threads = int(kwargs.get("threads") or _usable_cores())
        proto = load_model(model)
        original = ir.serde.deserialize_model(proto)  # optimise works on clones: this stays as given
        optimised, skipped = optimise(original)
        workdir = Path(tempfile.mkdtemp(prefix=f"dlopt-backend-{cls.target}-"))
        try:
            engine = cls.engine(optimised, workdir, threads=threads, lift=bool(kwargs.get("lift", True)),
                                original=original)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        rep = DloptRep(engine, proto, workdir)
        rep.skipped_passes = skipped
        return rep

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = DEVICE, **kwargs: Any) -> list:
        rep = cls.prepare(model, device, **kwargs)
        try:
            return rep.run(inputs)
        finally:
            rep.close()

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = DEVICE,
                 outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None, **kwargs: Any) -> list:
        """Run one node on ``inputs`` (arrays in the node's input order, or a dict by name)."""
        super().run_node(node, inputs, device=device, outputs_info=outputs_info, **kwargs)
        opset = kwargs.pop("opset_version", None)
        model = node_model(node, inputs, outputs_info, opset)
        return cls.run_model(model, inputs, device, **kwargs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper().split(":")[0] == DEVICE


def node_model(node: onnx.NodeProto, inputs: Any, outputs_info=None, opset: int | None = None) -> onnx.ModelProto:
    """A one-node model whose inputs take the types of ``inputs`` (outputs from ``outputs_info``
    or from ONNX shape inference)."""
    names = [n for n in node.input if n]
    arrays = [inputs[n] for n in names] if isinstance(inputs, dict) else [np.asarray(a) for a in inputs]
    if len(arrays) != len(names):
        raise ConfigError(f"node {node.op_type} takes {len(names)} input(s), {len(arrays)} were given")
    graph_inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for n, a in zip(names, arrays)]
    if outputs_info is not None:
        outputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t)), s)
                   for n, (t, s) in zip(node.output, outputs_info)]
    else:
        outputs = [onnx.ValueInfoProto(name=n) for n in node.output if n]
    opsets = [onnx.helper.make_opsetid(node.domain or "", opset or onnx.defs.onnx_opset_version())]
    model = onnx.helper.make_model(onnx.helper.make_graph([node], f"{node.op_type}_node", graph_inputs, outputs),
                                   opset_imports=opsets)
    if outputs_info is None:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info}
        for out in model.graph.output:
            if out.name in inferred:
                out.CopyFrom(inferred[out.name])
    return model


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def module_api(target: str, class_name: str) -> tuple:
    """What a module of this package offers over dlopt backend (or profile) ``target``, as
    ``onnxruntime.backend`` does: its backend class, ``prepare``, ``run_model`` (twice: also as ``run``),
    ``run_node``, ``supports_device`` and ``is_compatible``."""
    backend = type(class_name, (DloptBackend,), {"target": target, "__module__": f"dlopt.onnx_backend.{target}"})
    run_model = backend.run_model
    return (backend, backend.prepare, run_model, run_model, backend.run_node, backend.supports_device,
            backend.is_compatible)


API = ["prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
