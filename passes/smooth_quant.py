"""SmoothQuantPass: move activation outliers into the weights before static INT8 (SmoothQuant)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir

from dlopt.core.errors import CompileError, ConfigError, DataError, first_line
from dlopt.core.model_io import save_ir

logger = logging.getLogger(__name__)

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)
_S_RANGE = (1e-5, 1e5)


@dataclass
class _Site:
    """One activation tensor X and the MatMul/Gemm nodes that multiply it by constant weights."""

    x: ir.Value
    channels: int  # K
    consumers: list[tuple[ir.Node, bool]] = field(default_factory=list)  # (node, weight is [N, K])

    def weight_row_max(self) -> np.ndarray:
        """max |W[k, :]| over every consumer's weight, one value per input channel k."""
        rows = [np.abs(_array(n.inputs[1])).max(axis=0 if t else 1) for n, t in self.consumers]
        return np.max(rows, axis=0).astype(np.float64)


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _constant(value: ir.Value | None) -> bool:
    """A weight the pass may rewrite: an initializer with data that callers cannot override."""
    return (value is not None and value.is_initializer() and not value.is_graph_input()
            and value.const_value is not None and value.dtype in _FLOATS)


def _weight_layout(node: ir.Node) -> bool | None:
    """For a smoothable MatMul/Gemm, whether its weight is stored [N, K] (Gemm transB); else None."""
    if len(node.inputs) < 2 or not _constant(node.inputs[1]) or _constant(node.inputs[0]):
        return None
    if node.inputs[0] is None or node.inputs[0].dtype not in (None, node.inputs[1].dtype):
        return None
    if len(node.inputs[1].const_value.shape) != 2:
        return None  # a batched weight has no single row per input channel
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get_int("transA", 0):
            return None
        return bool(attrs.get_int("transB", 0))
    return False


def _channel_vector(value: ir.Value | None, k: int) -> bool:
    """A constant used once whose shape broadcasts over the last axis only ([K], [1, 1, K] ...)."""
    if not _constant(value) or len(value.uses()) != 1 or value.is_graph_output():
        return False
    shape = tuple(value.const_value.shape)
    return bool(shape) and shape[-1] == k and int(np.prod(shape)) == k


def _fold_targets(x: ir.Value, k: int) -> list[ir.Value] | None:
    """The constants to divide by s so the producer of ``x`` emits ``x / s``, or None."""
    node = x.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "LayerNormalization" and node.outputs[0] is x:
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        targets = [v for v in (scale, bias) if v is not None]
        return targets if scale is not None and all(_channel_vector(v, k) for v in targets) else None
    if node.op_type == "Add":  # torch's decomposed LayerNorm below opset 17: Add(Mul(n, gamma), beta)
        for mul_out, beta in (node.inputs, node.inputs[::-1]):
            mul = mul_out.producer() if mul_out is not None else None
            if (mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx")
                    or len(mul_out.uses()) != 1 or mul_out.is_graph_output() or not _channel_vector(beta, k)):
                continue
            gammas = [v for v in mul.inputs if _channel_vector(v, k)]
            if len(gammas) == 1:
                return [gammas[0], beta]
    return None


class SmoothQuantPass(ir.passes.FunctionalPass):
    """Divide MatMul/Gemm activations by per-channel factors s and multiply the weights by them.

    For ``Y = X @ W`` with a constant ``W``, ``s_k = max|X_k|^alpha / max|W_k,:|^(1-alpha)``
    (max |X| from ``calibration``, one ORT run of the float model), and the model computes
    ``(X / s) @ (diag(s) W)``: the same result in float, but the activation's outlier
    channels shrink, so per-tensor INT8 of X keeps its small channels.

    Guarantees: outputs are unchanged in float (up to rounding); X / s is folded into a
    LayerNormalization's Scale/Bias (or torch's decomposed ``Add(Mul(n, gamma), beta)``)
    when all readers of X are smoothed and those constants are used only there, else a
    ``Mul(X, 1/s)`` feeds just the smoothed readers.  Readers of one X share one s.
    Weights shared with other nodes are copied, never rescaled in place.  MatMuls of two
    activations (attention's Q K^T) are left alone.  ``note`` says what was done.
    """

    def __init__(
        self,
        *,
        calibration: Sequence[dict[str, np.ndarray]],
        alpha: float = 0.5,
        op_types: Sequence[str] = ("MatMul", "Gemm"),
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"SmoothQuant alpha must be between 0 and 1, got {alpha}")
        self.calibration = calibration
        self.alpha = float(alpha)
        self.op_types = tuple(op_types)
        self.smoothed = 0
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model = model.clone()  # initializer tensors stay shared: rescaled ones are replaced, not edited
        sites = self._sites(model.graph)
        folded = inserted = 0
        if sites:
            maxima = self._activation_maxima(model, sites)
            for site in sites:
                scale = self._scale(maxima[site.x.name], site.weight_row_max())
                if scale is None:
                    continue
                if self._fold_or_insert(model.graph, site, scale):
                    folded += 1
                else:
                    inserted += 1
                for node, transposed in site.consumers:
                    _scale_weight(model.graph, node, scale, transposed)
                logger.debug("smoothed %s (K=%d) for %d reader(s)", site.x.name, site.channels, len(site.consumers))
            model.graph.sort()
        self.smoothed = folded + inserted
        self.note = (f"alpha {self.alpha}: smoothed {self.smoothed} MatMul/Gemm inputs "
                     f"({folded} folded into LayerNorm, {inserted} Mul inserted)")
        return ir.passes.PassResult(model, self.smoothed > 0)

    def _sites(self, graph: ir.Graph) -> list[_Site]:
        sites: dict[str, _Site] = {}
        for node in graph:
            if node.op_type not in self.op_types or node.domain not in ("", "ai.onnx"):
                continue
            layout = _weight_layout(node)
            x = node.inputs[0]
            if layout is None or not x.name:
                continue
            k = _array(node.inputs[1]).shape[1 if layout else 0]
            site = sites.setdefault(x.name, _Site(x, k))
            if site.channels == k:  # differs only in an invalid model; that reader then counts as foreign
                site.consumers.append((node, layout))
        return list(sites.values())

    def _activation_maxima(self, model: ir.Model, sites: list[_Site]) -> dict[str, np.ndarray]:
        """Per-channel max |X| of every site over the calibration batches, batch by batch."""
        import onnxruntime as ort

        probe = model.clone()
        values = {v.name: v for n in probe.graph for v in n.outputs} | {v.name: v for v in probe.graph.inputs}
        outputs = {v.name for v in probe.graph.outputs}
        for site in sites:
            value = values[site.x.name]
            if value.dtype is None:
                value.dtype = site.consumers[0][0].inputs[1].dtype  # MatMul/Gemm inputs share a type
            if value.name not in outputs:
                probe.graph.outputs.append(value)
        names = [site.x.name for site in sites]
        maxima: dict[str, np.ndarray] = {}
        batches = 0
        with tempfile.TemporaryDirectory(prefix="dlopt-smooth-") as tmp:
            path = Path(tmp) / "probe.onnx"
            save_ir(probe, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.log_severity_level = 3
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for feed in self.calibration:
                    for name, array in zip(names, session.run(names, feed), strict=True):
                        array = np.abs(np.asarray(array, dtype=np.float64))
                        peak = array.reshape(-1, array.shape[-1]).max(axis=0)
                        maxima[name] = np.maximum(maxima[name], peak) if name in maxima else peak
                    batches += 1
            except Exception as exc:
                raise CompileError(f"SmoothQuant calibration failed: {first_line(exc)}") from exc
        if batches == 0:
            raise DataError("SmoothQuant calibration data holds no batches")
        return maxima

    def _scale(self, x_max: np.ndarray, w_max: np.ndarray) -> np.ndarray | None:
        if x_max.shape != w_max.shape:
            return None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = x_max ** self.alpha / w_max ** (1.0 - self.alpha)
        s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
        return np.clip(s, *_S_RANGE)

    @staticmethod
    def _fold_or_insert(graph: ir.Graph, site: _Site, scale: np.ndarray) -> bool:
        """Make the smoothed readers see X / s; True when folded into the producer's constants."""
        readers = {id(node) for node, _ in site.consumers}
        x = site.x
        only_readers = all(id(use.node) in readers for use in x.uses())
        targets = _fold_targets(x, len(scale)) if only_readers and not x.is_graph_output() else None
        if targets is not None:
            for value in targets:
                array = _array(value)
                value.const_value = ir.tensor((array / scale).astype(array.dtype), name=value.name)
            return True
        weight_type = site.consumers[0][0].inputs[1].dtype  # MatMul/Gemm inputs share one type
        dtype = weight_type.numpy()
        inv = _new_initializer(graph, f"{x.name}_smooth_inv_s", (1.0 / scale).astype(dtype))
        first = min((node for node, _ in site.consumers), key=lambda n: graph.index(n))
        mul = ir.node("Mul", [x, inv], name=f"{x.name}_smooth_mul")
        mul.outputs[0].name = f"{x.name}_smoothed"
        mul.outputs[0].dtype, mul.outputs[0].shape = weight_type, x.shape
        graph.insert_before(first, mul)
        for node, _ in site.consumers:
            node.replace_input_with(0, mul.outputs[0])
        return False


def _scale_weight(graph: ir.Graph, node: ir.Node, scale: np.ndarray, transposed: bool) -> None:
    """Multiply the rows (input channels) of ``node``'s weight by ``scale``; copy a shared weight."""
    weight = node.inputs[1]
    array = _array(weight)
    scaled = (array * (scale[None, :] if transposed else scale[:, None])).astype(array.dtype)
    if len(weight.uses()) == 1 and not weight.is_graph_output():
        weight.const_value = ir.tensor(scaled, name=weight.name)
        return
    copy = _new_initializer(graph, f"{weight.name}_smooth_{node.name or graph.index(node)}", scaled)
    node.replace_input_with(1, copy)
