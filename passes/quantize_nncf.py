"""QuantizeNncfPass: INT8 post-training quantisation with NNCF, OpenVINO's quantiser, in QDQ form."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import sys
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from dlopt.core.errors import CompileError, DataError, TargetUnavailable, first_line
from dlopt.core.optional import hidden
from dlopt.core.scoped_env import environ

logger = logging.getLogger("dlopt.quantization")


def available() -> bool | str:
    # find_spec, not import: importing nncf takes ~2 s (it pulls in ONNX Runtime, scipy, rich).
    if importlib.util.find_spec("nncf") is None:
        return "nncf is not installed; install dlopt[nncf]"
    return True


def _version() -> str:
    try:
        return importlib.metadata.version("nncf")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _import_nncf():
    """Import nncf with its telemetry off.

    On import nncf builds an ``openvino_telemetry.Telemetry``, which without an opt-out
    writes ``~/intel/stats`` and ``~/intel/openvino_ga_cid`` and later posts events to
    Google Analytics from ``nncf.quantize``.  ``CI=true`` makes openvino_telemetry decline
    before it touches any file; ``NNCF_CI`` makes nncf swap in its no-op stub.  Both are
    read only during the import, so they are set only around it.
    """
    fresh = "nncf" not in sys.modules
    with environ(CI="true", NNCF_CI="1") if fresh else contextlib.nullcontext(), hidden("torch"):
        import nncf
    from nncf.telemetry import decorator, wrapper

    # Imported before us by someone else, without the opt-out: stub the decorator's reference too.
    if not isinstance(decorator.telemetry, wrapper.NNCFTelemetryStub):
        decorator.telemetry = wrapper.NNCFTelemetryStub()
    return nncf


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.debug("nncf: %s", record.getMessage())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Route NNCF's log lines, warnings and rich progress bars (stdout, TTY or not) to debug logging."""
    from nncf.common.logging.logger import nncf_logger

    handlers, level = list(nncf_logger.handlers), nncf_logger.level
    nncf_logger.handlers = [_ToDebug()]
    # nncf's INFO lines ("shape … unknown, consider pre-processing") cost formatting: skip unless shown
    nncf_logger.setLevel(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for warning in caught:
                    logger.debug("nncf: %s", warning.message)
    finally:
        nncf_logger.handlers = handlers
        nncf_logger.setLevel(level)
        if buffer.getvalue().strip():
            logger.debug("nncf: %s", buffer.getvalue().strip())


def _prepare(proto) -> int:
    """Make the model safe for NNCF's pre-passes; return how many Casts were folded.

    NNCF reads the opset from ``opset_import[0]`` whatever its domain, and its
    ``eliminate_nop_cast`` crashes (AttributeError) on a Cast that reads an initializer;
    dlopt's generic passes fold such Casts unless they are too large to fold (e.g. a big
    float16 table cast to float32), so fold them here.
    """
    from onnx import helper, numpy_helper

    imports = sorted(proto.opset_import, key=lambda o: o.domain not in ("", "ai.onnx"))
    del proto.opset_import[:]
    proto.opset_import.extend(imports)

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    overridable = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    folded = []
    for node in graph.node:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        source, target = node.input[0], node.output[0]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if source not in inits or source in overridable or target in outputs or to is None:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(to)
        if dtype.kind not in "biufc":  # bfloat16, float8: numpy cannot cast to them
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[source]).astype(dtype), target))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = _used_names(graph) | outputs
    for name in {n.input[0] for n in folded} - used:
        graph.initializer.remove(inits[name])
    return len(folded)


def _used_names(graph) -> set[str]:
    """Every name a node reads, in ``graph`` and its subgraphs."""
    from onnx import AttributeProto

    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                names |= _used_names(sub)
    return names


def _samples(batch: dict[str, np.ndarray]) -> int:
    first = next(iter(batch.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1


class _Counted:
    """The calibration batches, re-iterable, counting what the latest read saw (NNCF reads them)."""

    def __init__(self, source: Iterable[dict[str, np.ndarray]]) -> None:
        self.source = source
        self.batches = self.samples = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.batches = self.samples = 0  # NNCF may stop reading at its subset size: count as it goes
        for feed in self.source:
            self.batches += 1
            self.samples += _samples(feed)
            yield feed


class QuantizeNncfPass(ir.passes.FunctionalPass):
    """Insert QuantizeLinear/DequantizeLinear pairs with NNCF's post-training quantisation.

    NNCF calibrates on ``calibration`` itself (every batch is one NNCF sample), places
    quantisers where OpenVINO's INT8 kernels expect them (never on Softmax or
    LayerNormalization inputs) and corrects biases.  ``transformer=True`` is NNCF's
    ``ModelType.TRANSFORMER``; for ONNX in NNCF 3.4 that is SmoothQuant (alpha 0.95) before
    MatMuls with constant weights, the "mixed" preset (asymmetric activations, but symmetric
    for activation-by-activation MatMuls), no quantisers on Add, Mul, Sub, Div, Pow, Sqrt,
    Reciprocal, Maximum, Reduce{Mean,Sum,L2}, comparisons, pooling and BatchNorm, and none on
    the softmax-by-V MatMul.  Nodes named in ``exclude_nodes`` stay in float; names not in
    the model are ignored.  Guarantees: the input model is unchanged; any NNCF failure is a
    CompileError; NNCF prints nothing and sends no telemetry.
    """

    def __init__(
        self,
        *,
        calibration: Iterable[dict[str, np.ndarray]],
        transformer: bool = False,
        exclude_nodes: Sequence[str] = (),
        fast_bias_correction: bool = True,
    ) -> None:
        super().__init__()
        # a re-iterable source (a list, a CalibrationDataset) is read batch by batch each time NNCF
        # needs it, never held whole; only a one-pass iterator is kept in a list
        self.calibration = list(calibration) if isinstance(calibration, Iterator) else calibration
        self.transformer = transformer
        self.exclude_nodes = tuple(exclude_nodes)
        self.fast_bias_correction = fast_bias_correction
        self.quantiser = "nncf " + _version()
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        reason = available()
        if reason is not True:
            raise TargetUnavailable(reason)
        batches = _Counted(self.calibration)
        try:
            count = len(self.calibration)
        except TypeError:  # a dataset that does not know its length until read once
            count = sum(1 for _ in batches)
        if not count:
            raise DataError("NNCF quantisation needs at least one calibration batch")
        try:
            nncf = _import_nncf()
        except Exception as exc:  # ImportError, or a broken dependency under it
            raise TargetUnavailable(f"nncf cannot be imported: {first_line(exc)}") from exc

        proto = ir.serde.serialize_model(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        names = {n.name for n in proto.graph.node}
        excluded = [n for n in self.exclude_nodes if n in names]
        try:
            folded = _prepare(proto)
            with _quiet(), hidden("torch"):
                quantized = nncf.quantize(
                    proto, nncf.Dataset(batches), subset_size=count,
                    model_type=nncf.ModelType.TRANSFORMER if self.transformer else None,
                    fast_bias_correction=self.fast_bias_correction,
                    # validate=False: nncf raises on a name it cannot match; those were dropped above anyway
                    ignored_scope=nncf.IgnoredScope(names=excluded, validate=False) if excluded else None,
                )
        except Exception as exc:
            raise CompileError(f"NNCF quantisation failed: {first_line(exc)}") from exc
        result = ir.serde.deserialize_model(quantized)

        n_dq = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear")
        samples = batches.samples
        recipe = ""
        if self.transformer:
            from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

            recipe = f" (transformer: SmoothQuant alpha {AdvancedSmoothQuantParameters().matmul:g} on MatMul)"
        self.note = (f"NNCF {nncf.__version__} PTQ{recipe}, {samples} calibration samples in "
                     f"{batches.batches} batches, {n_dq} DequantizeLinear, {len(excluded)} node(s) kept in float"
                     + (f"; {folded} Cast(s) of initializers folded" if folded else "")
                     # NNCF then falls back to per-tensor weights, which broke every real model tried
                     + (f"; per-tensor weights (opset {opset} < 13)" if opset < 13 else ""))
        missing = len(self.exclude_nodes) - len(excluded)
        if missing:
            logger.debug("NNCF: %d excluded node name(s) not in the model", missing)
        return ir.passes.PassResult(result, True)
