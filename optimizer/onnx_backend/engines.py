"""Engines: a dlopt backend's compiled model as a function of feeds.

Before any build, ``lower`` writes out the ops a backend lacks (its ``supports`` check),
or converts wrongly (its ``expand_function_ops``), as their ONNX function bodies
(``ExpandFunctionOpsPass``).

* :class:`CompiledEngine` (ONNX Runtime) and :class:`OpenVinoEngine` compile once, in
  ``prepare``; the latter passes bfloat16, float8 and 4-bit tensors as raw bits.
* :class:`SpecialisingEngine` (TVM) compiles at the first run, when the inputs are
  known: TVM builds for static shapes and takes shape-like operands only as constants,
  so each build fixes the input shapes (``FixInputShapesPass``), binds the inputs used
  only as shapes, axes or counts (``BindShapeInputsPass``) and folds what became
  constant (``FoldConstantsPass``).  A run with other shapes or other values of a
  bound input builds again; builds are kept per key.
* :class:`FallbackEngine` (the ``cpu`` profile) tries the profile's backends in order
  and keeps, at the first run, the first one whose outputs match the ONNX reference
  implementation's where that runs the model, else the first that runs it (checked
  against ONNX Runtime where that is not the first).
"""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np
import onnx_ir as ir

from dlopt.core.errors import CompileError, TargetUnavailable, first_line
from dlopt.core.profiles import resolve_target
from dlopt.targets import REFERENCE_BACKEND, backend_status, get_backend

logger = logging.getLogger(__name__)

REFERENCE = REFERENCE_BACKEND  # the cpu engine checks another backend's outputs against this one


def _specialising(name: str) -> bool:
    """Whether backend ``name``'s compile needs the inputs themselves (its ``compiles_per_input_shapes``)."""
    backend = get_backend(name)
    return backend is not None and backend.compiles_per_input_shapes


def _backend(name: str):
    status = backend_status(name)
    if status is not True:
        raise TargetUnavailable(f"{name}: {status}")
    return get_backend(name)


def _profile():
    from dlopt.onnx_backend._api import PROFILE

    return resolve_target(PROFILE)


def unsupported(name: str, model: ir.Model) -> list[str]:
    """Ops of ``model`` backend ``name`` cannot run (its own ``supports`` check)."""
    if name == "cpu":
        lists = [unsupported(b, model) for b in _profile().backends if _available(b)]
        return min(lists, key=len) if lists else ["no CPU backend is available"]
    return lower(name, model)[1]


def _available(name: str) -> bool:
    from dlopt.targets import backend_status

    return backend_status(name) is True


def lower(name: str, model: ir.Model, *, lift: bool = True) -> tuple[ir.Model, list[str]]:
    """``model`` with the ops backend ``name`` lacks (or gets wrong) written out as their ONNX
    function bodies (not with ``lift=False``), and the ops it still cannot run.  The model's
    ``meta["dlopt.lifted"]`` lists the expansions."""
    from dlopt.passes.expand_functions import ExpandFunctionOpsPass, has_function_body
    from dlopt.core.pipeline import run_pipeline

    backend = _backend(name)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    present = {n.op_type for n in model.graph if n.domain in ("", "ai.onnx")}
    missing = backend.supports(model)
    for _ in range(2 if lift else 0):  # a body may hold another op to expand
        # a supports() entry may carry why ("NegativeLogLikelihoodLoss (converter failed: ...)")
        ops = [op.partition(" (")[0] for op in missing]
        wanted = {op for op in [*ops, *(backend.expand_function_ops & present)]
                  if has_function_body(op, opset)}
        if not wanted:
            break
        expand = ExpandFunctionOpsPass(op_types=wanted)
        model = run_pipeline(model.clone(), [expand]).model
        if not expand.expanded:
            break
        model.meta["dlopt.lifted"] = [*model.meta.get("dlopt.lifted", []), f"expanded {expand.note}"]
        present = {n.op_type for n in model.graph if n.domain in ("", "ai.onnx")}
        missing = backend.supports(model)
    return model, missing


def compile_and_load(name: str, model: ir.Model, workdir: Path, *, threads: int, shapes=None):
    """The loaded session of ``model`` built by backend ``name`` (fp32, its lowering passes first)."""
    from dlopt.core.pipeline import run_pipeline
    from dlopt.targets import load

    backend = _backend(name)
    lowered = run_pipeline(model.clone(), backend.lowering_passes("fp32")).model
    artifact = backend.compile(lowered, _profile(), workdir, precision="fp32", threads=threads, shapes=shapes)
    return load(artifact)


class CompiledEngine:
    def __init__(self, name: str, model: ir.Model, workdir: Path, *, threads: int) -> None:
        self.name = name
        self.session = compile_and_load(name, model, workdir, threads=threads)
        self._feeds = _feed_names(model, list(getattr(self.session, "input_names", None) or ()))

    def run(self, feeds: dict) -> list:
        if self._feeds is not None:
            feeds = {ours: feeds[theirs] for ours, theirs in self._feeds.items() if theirs in feeds}
        return self.session.run(feeds)


class OrtEngine(CompiledEngine):
    """bfloat16 and float8 inputs go to ONNX Runtime as OrtValues of their ONNX type: its Python
    API takes no ml_dtypes array ("Numpy_type ... can't be converted to MLDataType")."""

    def run(self, feeds: dict) -> list:
        import onnxruntime as ort
        from onnx.helper import np_dtype_to_tensor_dtype

        from dlopt.onnx_backend.narrow_types import narrow, packed

        feeds = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                     v.view(f"u{v.dtype.itemsize}"), np_dtype_to_tensor_dtype(v.dtype))
                 if isinstance(v, np.ndarray) and narrow(v.dtype) and not packed(v.dtype) else v
                 for k, v in feeds.items()}
        return super().run(feeds)


class OpenVinoEngine(CompiledEngine):
    """Narrow types (bfloat16, float8, 4-bit) cross OpenVINO's Python API as raw bits (narrow_types)."""

    def __init__(self, name: str, model: ir.Model, workdir: Path, *, threads: int) -> None:
        super().__init__(name, model, workdir, threads=threads)
        compiled = self.session.compiled
        self._ports = {n: port.get_element_type() for port in compiled.inputs for n in port.get_names()}
        self._outputs = []
        for value, port in zip(model.graph.outputs, compiled.outputs):
            dtype = value.dtype.numpy() if value.dtype is not None else None
            shape = port.get_partial_shape()
            self._outputs.append((dtype, tuple(shape.to_shape()) if shape.is_static else None))

    def run(self, feeds: dict) -> list:
        from dlopt.onnx_backend.narrow_types import from_output, narrow, to_tensor

        feeds = {k: to_tensor(v, self._ports[k]) if isinstance(v, np.ndarray) and narrow(v.dtype) and k in self._ports
                 else v for k, v in feeds.items()}
        outputs = super().run(feeds)
        return [from_output(out, dtype, shape) if dtype is not None and narrow(dtype) and isinstance(out, np.ndarray)
                else out for out, (dtype, shape) in zip(outputs, self._outputs)] + outputs[len(self._outputs):]


def _feed_names(model: ir.Model, session_names: list[str]) -> dict[str, str] | None:
    """The session's input name -> the model's, where they differ: a runtime may drop an input
    nothing reads, and OpenVINO's IR renames some (Attention's K and V came back as v, v_1)."""
    ours = [v.name for v in model.graph.inputs if v.name not in model.graph.initializers]
    if not session_names or session_names == ours:
        return None
    if set(session_names) <= set(ours):
        return {n: n for n in session_names}
    if len(session_names) == len(ours):
        return dict(zip(session_names, ours))
    return None


class SpecialisingEngine:
    """``lifted`` lists what dlopt's passes did to the model last built (``lift=False``: only the
    input shapes are fixed, as a plain wrapper around the engine would build it)."""

    def __init__(self, name: str, model: ir.Model, workdir: Path, *, threads: int, lift: bool = True) -> None:
        from dlopt.passes.bind_shape_inputs import shape_inputs

        self.name, self.model, self.workdir, self.threads, self.lift = name, model, workdir, threads, lift
        self.bindable = shape_inputs(model) if lift else []
        self.lifted: list[str] = list(model.meta.get("dlopt.lifted", []))
        self._sessions: dict[tuple, object] = {}

    def _key(self, feeds: dict) -> tuple:
        shapes = tuple((k, np.shape(v), str(np.asarray(v).dtype)) for k, v in sorted(feeds.items()))
        return shapes, tuple(np.asarray(feeds[k]).tobytes() for k in self.bindable if k in feeds)

    def specialised(self, feeds: dict) -> ir.Model:
        """The model for these feeds: static input shapes, shape inputs bound, constants folded."""
        from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

        from dlopt.passes import FoldConstantsPass
        from dlopt.passes.bind_shape_inputs import BindShapeInputsPass
        from dlopt.passes.fix_input_shapes import FixInputShapesPass
        from dlopt.core.pipeline import run_pipeline

        arrays = {k: v for k, v in feeds.items() if isinstance(v, np.ndarray)}
        passes = [FixInputShapesPass(shapes={k: v.shape for k, v in arrays.items()})]
        if self.lift:
            passes += [BindShapeInputsPass(values={k: arrays[k] for k in self.bindable if k in arrays}),
                       ShapeInferencePass(strict_mode=False), FoldConstantsPass(), RemoveUnusedNodesPass()]
        result = run_pipeline(self.model.clone(), passes)
        self.lifted = list(self.model.meta.get("dlopt.lifted", [])) + [
            f"{r.name}{': ' + r.note if r.note else ''}" for r in result.records[1:] if r.modified]
        return _outputs_computed(result.model) if self.lift else result.model

    def run(self, feeds: dict) -> list:
        key = self._key(feeds)
        session = self._sessions.get(key)
        if session is None:
            model = self.specialised(feeds)
            shapes = {k: np.shape(v) for k, v in feeds.items()}
            folder = self.workdir / f"build-{len(self._sessions)}"
            session = compile_and_load(self.name, model, folder, threads=self.threads, shapes=shapes)
            self._sessions[key] = session
        return session.run(feeds)


def _outputs_computed(model: ir.Model) -> ir.Model:
    """Outputs folded into constants are returned through an Identity: TVM's frontend cannot
    return a constant it was handed as the graph's output (``Shape`` of a static input)."""
    for i, out in enumerate(list(model.graph.outputs)):
        producer = out.producer()
        if out.is_initializer() or (producer is not None and producer.op_type == "Constant"):
            name, out.name = out.name, f"{out.name}_folded"
            result = ir.Value(name=name, type=out.type, shape=out.shape)
            model.graph.append(ir.Node("", "Identity", [out], outputs=[result]))
            model.graph.outputs[i] = result
    return model


def engine_for(name: str, model: ir.Model, workdir: Path, *, threads: int, lift: bool = True,
               original: ir.Model | None = None):
    """``original``: the model as given, before dlopt's passes (the ``cpu`` engine's reference runs it)."""
    if name == "cpu":
        return FallbackEngine(model, workdir, threads=threads, original=original)
    model, unsupported_ops = lower(name, model, lift=lift)
    if unsupported_ops:
        raise CompileError(f"{name} cannot run {', '.join(unsupported_ops)}")
    if _specialising(name):
        return SpecialisingEngine(name, model, workdir / name, threads=threads, lift=lift)
    return _engine_class(name)(name, model, workdir / name, threads=threads)


_ENGINES = {"ort": OrtEngine, "openvino": OpenVinoEngine}


def _engine_class(name: str) -> type:
    return SpecialisingEngine if _specialising(name) else _ENGINES.get(name, CompiledEngine)


def agree(a: list, b: list, *, rtol: float = 1e-3, atol: float = 1e-5) -> bool:
    """Whether two backends' outputs are the same within the ONNX backend tests' tolerance."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
            if not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple))
                    and agree(list(x), list(y), rtol=rtol, atol=atol)):
                return False
            continue
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return False
        if x.dtype == object or y.dtype == object or x.dtype.kind in "biuSU" or y.dtype.kind in "biuSU":
            if not np.array_equal(x, y):
                return False
        elif not np.allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


class FallbackEngine:
    """The ``cpu`` profile's backends in order; the model runs on the first that runs it correctly.

    ``prepare`` drops backends whose ``supports`` check names an op they lack (after
    ``lower``).  At the first run each remaining backend is built and run in order until
    one gives outputs.  Which one keeps the model:

    1. Where the ONNX reference implementation runs the model (small models,
       ``dlopt.onnx_backend.reference``), the first backend in order whose outputs match the
       reference's to the ONNX backend tests' tolerance: when the first to run does not
       match, the others are built and run too.  The reference runs ``original``, the
       model as given: a pass that changed its meaning (onnxscript's fold of CastLike into
       Cast drops ``saturate=0``) is not taken as the truth.  It only arbitrates: its own
       outputs are never returned.
    2. Otherwise (no reference, or no backend matches it), the first backend that ran,
       checked against ONNX Runtime where that is not the first: on a disagreement ONNX
       Runtime's outputs are taken, and it runs the model from then on.  (A vote among
       three engines was tried and dropped: on the ONNX backend tests, wherever two engines
       outvoted ONNX Runtime they shared the same wrong answer.)

    ``chosen`` and ``reasons`` say what happened.
    """

    def __init__(self, model: ir.Model, workdir: Path, *, threads: int, original: ir.Model | None = None) -> None:
        self.model, self.workdir, self.threads = model, workdir, threads
        self.original = original if original is not None else model
        self.reasons: dict[str, str] = {}
        self.candidates: list[str] = []
        self._models: dict[str, ir.Model] = {}
        for name in _profile().backends:
            try:
                self._models[name], missing = lower(name, model)
            except Exception as exc:  # an unusable backend is one reason among others
                missing = [f"<{first_line(exc)}>"]
            if missing:
                self.reasons[name] = f"cannot run {', '.join(missing)}"
            else:
                self.candidates.append(name)
        if not self.candidates:
            raise CompileError("no CPU backend runs this model: "
                               + "; ".join(f"{k}: {v}" for k, v in self.reasons.items()))
        self._engines: dict[str, object] = {}
        self.chosen: str | None = None

    def _engine(self, name: str):
        if name not in self._engines:
            model, folder = self._models[name], self.workdir / name
            self._engines[name] = _engine_class(name)(name, model, folder, threads=self.threads)
        return self._engines[name]

    def _try(self, name: str, feeds: dict) -> list | None:
        try:
            return list(self._engine(name).run(feeds))
        except Exception as exc:  # a backend that fails hands over to the next
            self.reasons[name] = first_line(exc)
            self.candidates = [c for c in self.candidates if c != name]
            logger.debug("cpu: %s failed: %s", name, self.reasons[name])
            return None

    def _first(self, names: list[str], feeds: dict):
        for name in names:
            out = self._try(name, feeds)
            if out is not None:
                return name, out
        return None, None

    def run(self, feeds: dict) -> list:
        if self.chosen is not None:
            out = self._try(self.chosen, feeds)
            if out is not None:
                return out
            self.chosen = None
        first, out = self._first(list(self.candidates), feeds)
        if first is None:
            raise CompileError("no CPU backend ran this model: "
                               + "; ".join(f"{k}: {v}" for k, v in self.reasons.items()))
        self.chosen = first
        checked = self._by_reference(first, out, feeds)
        if checked is not None:
            self.chosen, out = checked
            return out
        if first != REFERENCE and REFERENCE in self.candidates:
            check = self._try(REFERENCE, feeds)
            if check is not None and not agree(out, check):
                logger.info("cpu: %s disagrees with %s; %s runs the model", first, REFERENCE, REFERENCE)
                self.reasons[first] = f"outputs differ from {REFERENCE}'s"
                self.chosen, out = REFERENCE, check
        return out

    def _by_reference(self, first: str, out: list, feeds: dict) -> tuple[str, list] | None:
        """The first backend in order whose outputs match the ONNX reference implementation's
        (``first``'s, ``out``, already known), or None where the reference cannot run the model
        or no backend matches it."""
        from dlopt.onnx_backend import reference

        want = reference.outputs(self.original, feeds)
        if want is None:
            return None
        if reference.matches(out, want):
            return first, out
        self.reasons[first] = "outputs differ from the ONNX reference implementation's"
        for name in [c for c in self.candidates if c != first]:
            other = self._try(name, feeds)
            if other is not None and reference.matches(other, want):
                logger.info("cpu: %s differs from the ONNX reference implementation; %s matches it", first, name)
                return name, other
            if other is not None:
                self.reasons[name] = "outputs differ from the ONNX reference implementation's"
        return None
