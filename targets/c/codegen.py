"""ONNX graph -> one C99 function over a static arena (the C backend's code generator).

Guarantees:
- ``generate`` returns model.c / model.h that call only the kernels in ``c_kernels``;
  weights are ``static const`` arrays (flash), activations live in one ``static`` arena
  placed by ``c_memory.plan``; the model's inputs are read from the caller's pointers
  and never written.
- Reshape-like ops cost nothing (the output aliases the input's bytes); elementwise ops
  write over their input when no later step reads it (in place).
- INT8 (QDQ) graphs: see ``c_codegen_int8``; the arena and the C text: ``c_program``.
- An op or form it cannot generate raises ModelError naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from dlopt.core.errors import ModelError
from dlopt.targets.c.codegen_int8 import Int8Ops, quantize_multiplier
from dlopt.targets.c.program import Generated, Step, _float, _fmt, comment_text, emit, prepare

__all__ = ["SUPPORTED_OPS", "generate", "prepare", "quantize_multiplier"]

SUPPORTED_OPS = frozenset({
    "Conv", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Gemm", "MatMul", "Flatten",
    "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Add", "Sub", "Mul", "Div", "Softmax",
    "Sigmoid", "Tanh", "QuantizeLinear", "DequantizeLinear", "Constant",
})
_INF = 3.4028234663852886e38  # FLT_MAX


class _Gen(Int8Ops):
    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for vi in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
            self.shapes[vi.name] = dims
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = [o.name for o in self.graph.output]
        self.inputs = [i.name for i in self.graph.input if i.name not in self.consts]
        self.kind: dict[str, str] = {i: "f" for i in self.inputs}  # "f" float, "q" int8
        self.qparams: dict[str, tuple[float, int]] = {}  # int8 tensor -> (scale, zero point)
        self.steps: list[Step] = []
        self.decls: list[str] = []
        self.const_names: dict[str, str] = {}
        self.weights_bytes = 0
        self.skip: set[int] = set()
        self.ops: dict[str, int] = {}

    # -- helpers -----------------------------------------------------------------------------------
    def numel(self, name: str) -> int:
        shape = self.shapes.get(name)
        if shape is None or any(d < 0 for d in shape):
            raise ModelError(f"tensor {name!r} has no static shape; give the input shapes (--shapes) so the "
                             f"C backend can size its buffers")
        return int(np.prod(shape, dtype=np.int64))

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def emit_const(self, values: np.ndarray, ctype: str, hint: str, *, optional: str | None = None) -> str:
        """A const array in flash; ``optional``: only when that macro is defined (not counted)."""
        cname = f"dl_w{len(self.const_names)}"
        self.const_names[f"{cname}:{hint}"] = cname
        values = np.ascontiguousarray(values)
        if optional is None:
            self.weights_bytes += values.size * np.dtype({"float": np.float32, "int8_t": np.int8,
                                                          "int32_t": np.int32}[ctype]).itemsize
        decl = (f"/* {comment_text(hint, 96)} */\nstatic const {ctype} {cname}[{max(values.size, 1)}] = {{\n"
                f"{_fmt(values, 'float' if ctype == 'float' else 'int')}\n}};")
        self.decls.append(f"#ifdef {optional}\n{decl}\n#endif" if optional else decl)
        return cname

    def float_const(self, name: str) -> np.ndarray | None:
        """A constant, or the float value of DequantizeLinear over a constant."""
        if name in self.consts:
            return self.consts[name].astype(np.float32)
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in self.consts:
            q, scale, zero, axis = self._dq_const(node)
            shape = [1] * q.ndim
            if scale.size > 1:
                shape[axis] = -1
            return ((q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
        return None

    def _dq_const(self, node):
        q = self.consts[node.input[0]]
        scale = self.consts[node.input[1]].astype(np.float32).reshape(-1)
        zero = (self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(1, q.dtype))
        zero = zero.astype(np.int64).reshape(-1)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        return q.astype(np.int64), scale, zero.astype(np.float32), axis

    def attr(self, node, key, default=None):
        for a in node.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    def single_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def add(self, op: str, step: Step) -> None:
        self.ops[op] = self.ops.get(op, 0) + 1
        step.op = op
        self.steps.append(step)

    def qp(self, node) -> tuple[float, int, bool]:
        """(scale, zero point as int8, was uint8) of a Q/DQ node with per-tensor constants."""
        scale = self.consts.get(node.input[1])
        zero = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            raise ModelError(f"{node.op_type} {node.name!r}: the C backend needs a constant per-tensor scale and "
                             f"zero point on activations")
        if zero.dtype not in (np.int8, np.uint8):
            raise ModelError(f"{node.op_type} {node.name!r}: {zero.dtype} quantisation; the C backend runs int8/uint8")
        shift = 128 if zero.dtype == np.uint8 else 0
        return float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]) - shift, shift == 128

    # -- the graph -----------------------------------------------------------------------------------
    def run(self) -> None:
        for index, node in enumerate(self.graph.node):
            if index in self.skip:
                continue
            if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
                raise ModelError(f"op {node.op_type} (node {node.name!r}) is not supported by the C backend; "
                                 f"supported: {', '.join(sorted(SUPPORTED_OPS))}")
            if all(i in self.consts or not i for i in node.input) and node.op_type != "Constant":
                if node.op_type == "DequantizeLinear":
                    continue  # a quantised weight: read by the kernel that uses it, or as floats
                raise ModelError(f"{node.op_type} {node.name!r} computes a constant; fold constants first")
            getattr(self, f"op_{node.op_type}", self.op_generic)(node)

    def op_generic(self, node) -> None:  # pragma: no cover - every SUPPORTED_OPS entry has a method
        raise ModelError(f"op {node.op_type} (node {node.name!r}) is not supported by the C backend")

    def op_Constant(self, node) -> None:
        value = self.attr(node, "value")
        if value is None:
            raise ModelError(f"Constant {node.name!r}: only the 'value' form is supported")
        self.consts[node.output[0]] = numpy_helper.to_array(value)

    def act_input(self, node, i: int = 0) -> str:
        name = node.input[i]
        if name not in self.kind:
            raise ModelError(f"{node.op_type} {node.name!r} reads {name!r}, which the C backend did not compute")
        if self.kind[name] != "f":
            raise ModelError(f"{node.op_type} {node.name!r} reads int8 tensor {name!r} without DequantizeLinear")
        return name

    def _activation_after(self, node) -> tuple[float, float, object | None]:
        """(lo, hi, node) of a Relu/Clip that is the only reader of ``node``'s output."""
        nxt = self.single_consumer(node.output[0])
        if nxt is None:
            return -_INF, _INF, None
        if nxt.op_type == "Relu":
            return 0.0, _INF, nxt
        if nxt.op_type == "Clip":
            lo, hi = self._clip_bounds(nxt)
            if lo is not None:
                return lo, hi, nxt
        return -_INF, _INF, None

    def _clip_bounds(self, node):
        lo, hi = self.attr(node, "min", -_INF), self.attr(node, "max", _INF)
        for i, default in ((1, lo), (2, hi)):
            if len(node.input) > i and node.input[i]:
                value = self.const(node.input[i])
                if value is None:
                    return None, None
                lo, hi = (float(value), hi) if i == 1 else (lo, float(value))
        lo, hi = float(max(lo, -_INF)), float(min(hi, _INF))
        if lo > hi and any(a.name in ("min", "max") for a in node.attribute):
            raise ModelError(f"Clip {node.name!r}: attribute min {lo:g} is over max {hi:g}, which ONNX Runtime "
                             f"refuses for Clip before opset 11; give min <= max")
        # Clip-11+: min > max sets every value to max (ORT: min(max(x, lo), hi)); the kernels test lo first
        return min(lo, hi), hi

    def _fuse_act(self, node):
        lo, hi, act = self._activation_after(node)
        out = node.output[0]
        if act is not None:
            self.skip.add(list(self.graph.node).index(act))
            out = act.output[0]
        return lo, hi, out

    def _conv_params(self, node, x_shape, y_shape, w_shape) -> str:
        kh, kw = w_shape[2], w_shape[3]
        strides = self.attr(node, "strides", [1, 1])
        dil = self.attr(node, "dilations", [1, 1])
        pads = self._pads(node, x_shape, y_shape, (kh, kw), strides, dil)
        group = self.attr(node, "group", 1)
        values = [x_shape[1], x_shape[2], x_shape[3], y_shape[1], y_shape[2], y_shape[3], kh, kw,
                  strides[0], strides[1], pads[0], pads[1], dil[0], dil[1], group]
        return self._param("dl_conv_t", values)

    def _pads(self, node, x_shape, y_shape, kernel, strides, dil):
        auto = self.attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = []
            for d in range(2):
                total = max((y_shape[2 + d] - 1) * strides[d] + (kernel[d] - 1) * dil[d] + 1 - x_shape[2 + d], 0)
                pads.append(total // 2 if auto == "SAME_UPPER" else total - total // 2)
            return pads
        pads = self.attr(node, "pads", [0, 0, 0, 0]) if auto == "NOTSET" else [0, 0, 0, 0]
        return pads[:2]

    def _param(self, ctype: str, values: list[int]) -> str:
        cname = f"dl_p{len(self.decls)}"
        self.decls.append(f"static const {ctype} {cname} = {{{', '.join(str(int(v)) for v in values)}}};")
        return cname

    def _check_4d(self, node, name):
        shape = self.shapes.get(name, ())
        if len(shape) != 4 or shape[0] != 1:
            raise ModelError(f"{node.op_type} {node.name!r}: the C backend runs 2-D NCHW with batch 1, got {shape}")
        return shape

    # -- float ops ----------------------------------------------------------------------------------
    def op_Conv(self, node) -> None:
        if self._try_int8(node):
            return
        x = self.act_input(node)
        x_shape = self._check_4d(node, x)
        w = self.float_const(node.input[1])
        if w is None:
            raise ModelError(f"Conv {node.name!r}: the C backend needs constant weights")
        b = self.float_const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        lo, hi, out = self._fuse_act(node)
        self.shapes[out] = y_shape = self._check_4d(node, node.output[0])
        params = self._conv_params(node, x_shape, y_shape, w.shape)
        wn = self.emit_const(w, "float", f"{node.name} weights")
        bn = self.emit_const(b, "float", f"{node.name} bias") if b is not None else None
        self.kind[out] = "f"
        self.add("Conv", Step(lambda P: f"dl_conv2d_f32(&{params}, {P(x)}, {wn}, {bn or 'NULL'}, {P(out)}, "
                                        f"{_float(lo)}, {_float(hi)});", [x], [out]))

    def _fc_weights(self, node):
        """(w as [N, K], bias or None, K, N) of a Gemm/MatMul with constant B."""
        w = self.float_const(node.input[1])
        if w is None or w.ndim != 2:
            raise ModelError(f"{node.op_type} {node.name!r}: the C backend needs a constant 2-D B")
        bias = None
        if node.op_type == "Gemm":
            if self.attr(node, "transA", 0):
                raise ModelError(f"Gemm {node.name!r}: transA is not supported by the C backend")
            w = w if self.attr(node, "transB", 0) else w.T
            w = w * np.float32(self.attr(node, "alpha", 1.0))
            if len(node.input) > 2 and node.input[2]:
                c = self.float_const(node.input[2])
                if c is None or c.size not in (1, w.shape[0]):
                    raise ModelError(f"Gemm {node.name!r}: C must be a constant of N values")
                bias = np.broadcast_to(c.reshape(-1), (w.shape[0],)) * np.float32(self.attr(node, "beta", 1.0))
        else:
            w = w.T
        return np.ascontiguousarray(w, np.float32), bias, w.shape[1], w.shape[0]

    def op_Gemm(self, node) -> None:
        if self._try_int8(node):
            return
        x = self.act_input(node)
        w, bias, k, n = self._fc_weights(node)
        rows = self.numel(x) // k
        lo, hi, out = self._fuse_act(node)
        self.shapes[out] = self.shapes.get(node.output[0], ())
        wn = self.emit_const(w, "float", f"{node.name} weights [N, K]")
        bn = self.emit_const(bias.astype(np.float32), "float", f"{node.name} bias") if bias is not None else None
        self.kind[out] = "f"

        def code(P):
            if rows == 1:
                return f"dl_fc_f32({P(x)}, {wn}, {bn or 'NULL'}, {P(out)}, {k}, {n}, {_float(lo)}, {_float(hi)});"
            return (f"for (int32_t r = 0; r < {rows}; ++r) dl_fc_f32({P(x)} + r * {k}, {wn}, {bn or 'NULL'}, "
                    f"{P(out)} + r * {n}, {k}, {n}, {_float(lo)}, {_float(hi)});")
        self.add(node.op_type, Step(code, [x], [out]))

    op_MatMul = op_Gemm

    def _pool(self, node, *, count_pad=0) -> str:
        x_shape = self._check_4d(node, node.input[0])
        y_shape = self._check_4d(node, node.output[0])
        kernel = self.attr(node, "kernel_shape")
        strides = self.attr(node, "strides", [1, 1])
        dil = self.attr(node, "dilations", [1, 1])
        if self.attr(node, "storage_order", 0):
            raise ModelError(f"MaxPool {node.name!r}: storage_order 1 is not supported by the C backend")
        pads = self._pads(node, x_shape, y_shape, kernel, strides, dil)
        return self._param("dl_pool_t", [x_shape[1], x_shape[2], x_shape[3], y_shape[2], y_shape[3], kernel[0],
                                         kernel[1], strides[0], strides[1], pads[0], pads[1], dil[0], dil[1],
                                         count_pad])

    def op_MaxPool(self, node) -> None:
        if len(node.output) > 1 and node.output[1]:
            raise ModelError(f"MaxPool {node.name!r}: the Indices output is not supported by the C backend")
        if self._try_int8_pool(node):
            return
        x, params = self.act_input(node), self._pool(node)
        self._unary(node, x, lambda P: f"dl_maxpool_f32(&{params}, {P(x)}, {P(node.output[0])});", inplace=False)

    def op_AveragePool(self, node) -> None:
        x, params = self.act_input(node), self._pool(node, count_pad=self.attr(node, "count_include_pad", 0))
        self._unary(node, x, lambda P: f"dl_avgpool_f32(&{params}, {P(x)}, {P(node.output[0])});", inplace=False)

    def op_GlobalAveragePool(self, node) -> None:
        x = self.act_input(node)
        shape = self._check_4d(node, x)
        self._unary(node, x, lambda P: f"dl_gap_f32({P(x)}, {P(node.output[0])}, {shape[1]}, "
                                       f"{shape[2] * shape[3]});", inplace=False)

    def op_ReduceMean(self, node) -> None:
        x = self.act_input(node)
        shape = self.shapes.get(x, ())
        self.numel(x)
        axes = self.attr(node, "axes")
        if self._opset() >= 18:
            if len(node.input) > 1 and node.input[1]:
                value = self.const(node.input[1])
                if value is None:
                    raise ModelError(f"ReduceMean {node.name!r}: the C backend needs constant axes; export with "
                                     f"fixed axes (x.mean((2, 3)) or adaptive_avg_pool2d(x, 1))")
                axes = [int(a) for a in value.reshape(-1)]
            if not axes and self.attr(node, "noop_with_empty_axes", 0):
                self._alias(node, x)
                return
        outer, red, inner = mean_block(node.name, shape, axes)
        if red == 1:  # averaging over axes of size 1: the same values, reshaped
            self._alias(node, x)
            return
        self._unary(node, x, lambda P: f"dl_mean_f32({P(x)}, {P(node.output[0])}, {outer}, {red}, {inner});",
                    inplace=False)

    def _alias(self, node, x) -> None:
        self.kind[node.output[0]] = "f"
        self.add(node.op_type, Step(lambda P: "", [x], [node.output[0]], alias=True))

    def _unary(self, node, x, code, *, inplace=True) -> None:
        self.kind[node.output[0]] = "f"
        self.add(node.op_type, Step(code, [x], [node.output[0]], inplace=inplace))

    def op_Relu(self, node) -> None:
        x, n = self.act_input(node), self.numel(node.input[0])
        self._unary(node, x, lambda P: f"dl_clip_f32({P(x)}, {P(node.output[0])}, {n}, 0.0f, {_float(_INF)});")

    def op_Clip(self, node) -> None:
        x, n = self.act_input(node), self.numel(node.input[0])
        lo, hi = self._clip_bounds(node)
        if lo is None:
            raise ModelError(f"Clip {node.name!r}: the C backend needs constant min and max")
        self._unary(node, x, lambda P: f"dl_clip_f32({P(x)}, {P(node.output[0])}, {n}, {_float(lo)}, {_float(hi)});")

    def op_Sigmoid(self, node) -> None:
        x, n = self.act_input(node), self.numel(node.input[0])
        self._unary(node, x, lambda P: f"dl_sigmoid_f32({P(x)}, {P(node.output[0])}, {n});")

    def op_Tanh(self, node) -> None:
        x, n = self.act_input(node), self.numel(node.input[0])
        self._unary(node, x, lambda P: f"dl_tanh_f32({P(x)}, {P(node.output[0])}, {n});")

    def op_Softmax(self, node) -> None:
        x = self.act_input(node)
        shape = self.shapes.get(x, ())
        self.numel(x)
        axis = self.attr(node, "axis", -1 if self._opset() >= 13 else 1) % len(shape)
        if self._opset() >= 13 and any(d != 1 for d in shape[axis + 1:]):
            raise ModelError(f"Softmax {node.name!r}: the C backend runs Softmax over the last axis only")
        cols = int(np.prod(shape[axis:]))
        rows = self.numel(x) // cols
        self._unary(node, x, lambda P: f"dl_softmax_f32({P(x)}, {P(node.output[0])}, {rows}, {cols});")

    def _opset(self) -> int:
        return self.opset

    def op_Flatten(self, node) -> None:
        dq_x, nxt = self._dq_act(node.input[0]), self.single_consumer(node.output[0])
        if dq_x is not None and nxt is not None and nxt.op_type == "QuantizeLinear" \
                and self.qp(dq_x)[:2] == self.qp(nxt)[:2]:  # DQ -> Reshape -> Q: the int8 bytes, reshaped
            x, out = dq_x.input[0], nxt.output[0]
            self.skip.add(list(self.graph.node).index(nxt))
            self.kind[out], self.qparams[out] = "q", self.qp(nxt)[:2]
            self.add(f"{node.op_type}[int8]", Step(lambda P: "", [x], [out], alias=True))
            return
        x = node.input[0]
        if x not in self.kind:
            raise ModelError(f"{node.op_type} {node.name!r} reads {x!r}, which the C backend did not compute")
        self.kind[node.output[0]] = self.kind[x]
        if x in self.qparams:
            self.qparams[node.output[0]] = self.qparams[x]
        self.add(node.op_type, Step(lambda P: "", [x], [node.output[0]], alias=True))

    op_Reshape = op_Squeeze = op_Unsqueeze = op_Identity = op_Dropout = op_Flatten

    def _binary(self, node, code: int) -> None:
        if self._try_int8_binary(node, code):
            return
        a, b = node.input[0], node.input[1]
        out_shape = self.shapes.get(node.output[0], ())
        n = self.numel(node.output[0])
        const_a, const_b = self.float_const(a), self.float_const(b)
        if const_a is not None and const_b is None:
            if code in (0, 2):
                a, b, const_a, const_b = b, a, None, const_a
            elif code == 1:
                a, b, const_a, const_b, code = b, a, None, const_a, 4
            else:
                raise ModelError(f"Div {node.name!r}: constant / activation is not supported by the C backend")
        a = self.act_input(node, list(node.input).index(a))
        if self.numel(a) != n:
            raise ModelError(f"{node.op_type} {node.name!r}: broadcasting the activation {a!r} is not supported")
        if const_b is None:
            b = self.act_input(node, list(node.input).index(b))
            if self.numel(b) != n:
                raise ModelError(f"{node.op_type} {node.name!r}: the C backend adds activations of one shape only")
            bn, inner, reads = n, 1, [a, b]
            ref = None
        else:
            values, bn, inner = _broadcast_block(const_b, out_shape)
            ref, reads = self.emit_const(values, "float", f"{node.name} operand"), [a]
        out = node.output[0]
        self.kind[out] = "f"
        self.add(node.op_type, Step(lambda P: f"dl_binary_f32({P(a)}, {ref or P(b)}, {P(out)}, {n}, {bn}, {inner}, "
                                              f"{code});", reads, [out], inplace=True))

    def op_Add(self, node): self._binary(node, 0)
    def op_Sub(self, node): self._binary(node, 1)
    def op_Mul(self, node): self._binary(node, 2)
    def op_Div(self, node): self._binary(node, 3)


def mean_block(node_name: str, shape, axes) -> tuple[int, int, int]:
    """(outer, red, inner) so that ReduceMean over ``axes`` (None or empty: all) of ``shape`` is the mean
    over ``red`` of ``x`` viewed as [outer, red, inner]; ModelError when the reduced axes are not one
    block (axes of size 1 do not count, so NCHW's (2, 3) and (1, 2, 3) are blocks, (1, 3) is not)."""
    rank = len(shape)
    if axes and any(not -rank <= int(a) < rank for a in axes):
        raise ModelError(f"ReduceMean {node_name!r}: axes {list(axes)} are out of range for rank {rank}")
    picked = sorted({int(a) % rank for a in axes} if axes else range(rank))
    big = [a for a in picked if shape[a] != 1]
    if not big:
        return int(np.prod(shape)), 1, 1
    kept_between = [d for d in range(big[0], big[-1] + 1) if d not in picked and shape[d] != 1]
    if kept_between:
        raise ModelError(f"ReduceMean {node_name!r}: the C backend averages over adjacent axes only; axes "
                         f"{list(axes)} of shape {tuple(shape)} keep axis {kept_between[0]} between them")
    return (int(np.prod(shape[:big[0]])), int(np.prod([shape[a] for a in big])),
            int(np.prod(shape[big[-1] + 1:])))


def _broadcast_block(c: np.ndarray, out_shape) -> tuple[np.ndarray, int, int]:
    """(values, bn, inner) so that out[i] pairs with values[(i // inner) % bn]."""
    rank = len(out_shape)
    if c.ndim > rank:
        raise ModelError(f"a constant operand of rank {c.ndim} does not broadcast to {tuple(out_shape)}")
    dims = (1,) * (rank - c.ndim) + tuple(c.shape)
    big = [d for d in range(rank) if dims[d] != 1]
    if not big:
        return c.reshape(-1).astype(np.float32), 1, 1
    lo, hi = big[0], big[-1]
    if all(dims[d] == out_shape[d] for d in range(lo, hi + 1)):
        return c.reshape(-1).astype(np.float32), int(np.prod(dims[lo:hi + 1])), int(np.prod(out_shape[hi + 1:]))
    full = np.broadcast_to(c.reshape(dims), out_shape).astype(np.float32)
    return full.reshape(-1), full.size, 1



def generate(model: onnx.ModelProto, *, header_note: str = "") -> Generated:
    """model.c and model.h for ``model`` (static shapes, batch 1, shapes inferred: see ``prepare``)."""
    gen = _Gen(model)
    gen.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    gen.run()
    return emit(gen, header_note=header_note)
