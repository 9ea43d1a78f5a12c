"""INT8 (QDQ) patterns of the C backend's code generator, with CMSIS-NN / TFLite Micro arithmetic.

Guarantees:
- DequantizeLinear(x) -> Conv/Gemm/MatMul(DequantizeLinear(W int8, zero point 0)) [-> Relu]
  -> QuantizeLinear becomes one int8 kernel: int32 accumulator and bias, a per-channel Q31
  multiplier and shift (TFLite's QuantizeMultiplier), Relu as the clamp at the output zero point.
- DQ -> MaxPool -> Q and DQ -> Reshape-like -> Q with one scale stay on the int8 bytes.
- DQ(a), DQ(b) -> Add/Sub/Mul [-> Relu] -> Q of one shape: int8 in and out, the arithmetic per
  element in float32 exactly as ONNX Runtime runs the QDQ graph (no float tensors in the arena).
- Any other Q/DQ node becomes a quantise/dequantise loop (round half to even, as ONNX);
  a pattern that does not match falls back to float kernels, never to a wrong result.
- uint8 tensors are held as int8 (value - 128, zero point - 128): the same arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

from dlopt.core.errors import ModelError
from dlopt.targets.c.program import Step, _float


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: real = mult * 2**(shift - 31) with mult a Q31 in [2**30, 2**31)."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    mult = round(q * (1 << 31))
    if mult == 1 << 31:
        mult, shift = mult // 2, shift + 1
    if shift < -31:
        return 0, 0
    return int(mult), int(shift)



class Int8Ops:
    """Methods of dlopt.targets.c.codegen._Gen for quantised graphs."""

    def op_QuantizeLinear(self, node) -> None:
        x, n = self.act_input(node), self.numel(node.input[0])
        scale, zero, _ = self.qp(node)
        out = node.output[0]
        self.kind[out], self.qparams[out] = "q", (scale, zero)
        self.add("QuantizeLinear", Step(lambda P: f"dl_quantize_s8({P(x)}, {P(out)}, {n}, {_float(scale)}, {zero});",
                                        [x], [out]))

    def op_DequantizeLinear(self, node) -> None:
        x = node.input[0]
        if self.kind.get(x) != "q":
            raise ModelError(f"DequantizeLinear {node.name!r} reads {x!r}, which is not an int8 tensor here")
        scale, zero, _ = self.qp(node)
        n, out = self.numel(x), node.output[0]
        self.kind[out] = "f"
        self.add("DequantizeLinear", Step(lambda P: f"dl_dequantize_s8({P(x)}, {P(out)}, {n}, {_float(scale)}, "
                                                    f"{zero});", [x], [out]))

    def _dq_act(self, name):
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or self.kind.get(node.input[0]) != "q":
            return None
        return node

    def _try_int8(self, node) -> bool:
        """Conv/Gemm/MatMul between DequantizeLinear and QuantizeLinear -> one int8 kernel."""
        dq_x = self._dq_act(node.input[0])
        dq_w = self.producer.get(node.input[1])
        if dq_x is None or dq_w is None or dq_w.op_type != "DequantizeLinear" or dq_w.input[0] not in self.consts:
            return False
        wq, wscale, wzero, axis = self._dq_const(dq_w)
        if np.any(wzero != 0) or self.consts[dq_w.input[0]].dtype != np.int8:
            return False
        relu = None
        nxt = self.single_consumer(node.output[0])
        if nxt is not None and nxt.op_type == "Relu":
            relu, nxt = nxt, self.single_consumer(nxt.output[0])
        if nxt is None or nxt.op_type != "QuantizeLinear":
            return False
        xs, xz, _ = self.qp(dq_x)
        ys, yz, _ = self.qp(nxt)
        if node.op_type == "Conv":
            n_out = wq.shape[0]
            if axis != 0 and wscale.size > 1:
                return False
        else:
            if node.op_type == "Gemm" and (self.attr(node, "transA", 0) or self.attr(node, "alpha", 1.0) != 1.0):
                return False
            trans = node.op_type == "Gemm" and self.attr(node, "transB", 0)
            if wscale.size > 1 and axis != (0 if trans else 1):
                return False
            wq = wq if trans else wq.T
            n_out = wq.shape[0]
        wscale = np.broadcast_to(wscale, (n_out,)).astype(np.float64)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bprod = self.producer.get(node.input[2])
            if bprod is not None and bprod.op_type == "DequantizeLinear" and bprod.input[0] in self.consts \
                    and self.consts[bprod.input[0]].dtype == np.int32:
                bq, bscale, _, _ = self._dq_const(bprod)
                if not np.allclose(np.broadcast_to(bscale, (n_out,)), xs * wscale, rtol=1e-5):
                    return False
                bias = bq.reshape(-1)
            else:
                fb = self.float_const(node.input[2])
                if fb is None:
                    return False
                if node.op_type == "Gemm":
                    fb = np.broadcast_to(fb.reshape(-1), (n_out,)) * self.attr(node, "beta", 1.0)
                bias = np.round(fb.reshape(-1).astype(np.float64) / (xs * wscale))
        mults = [quantize_multiplier(xs * s / ys) for s in wscale]
        mult = np.array([m for m, _ in mults], np.int64)
        shift = np.array([s for _, s in mults], np.int64)
        lo = max(-128, yz) if relu is not None else -128
        x, out = dq_x.input[0], nxt.output[0]
        self.skip.update(list(self.graph.node).index(n) for n in (relu, nxt) if n is not None)
        self.kind[out], self.qparams[out] = "q", (ys, yz)
        wn = self.emit_const(wq.astype(np.int8), "int8_t", f"{node.name} int8 weights")
        bn = self.emit_const(bias.astype(np.int32), "int32_t", f"{node.name} int32 bias") if bias is not None else None
        mn = self.emit_const(mult, "int32_t", f"{node.name} requantisation multipliers (Q31)")
        sn = self.emit_const(shift, "int32_t", f"{node.name} requantisation shifts")
        # ONNX Runtime's float32 scales (x_scale * w_scale / y_scale in float32), for -DDLOPT_REQUANT_FLOAT
        fscale = (np.float32(xs) * wscale.astype(np.float32) / np.float32(ys)).astype(np.float32)
        fn = self.emit_const(fscale, "float", f"{node.name} float requantisation scales", optional="DLOPT_REQUANT_FLOAT")
        common = f"{wn}, {bn or 'NULL'}, {mn}, {sn}, DL_FSCALE({fn})"
        if node.op_type == "Conv":
            x_shape = self._check_4d(node, dq_x.output[0])
            y_shape = self._check_4d(node, node.output[0])
            params = self._conv_params(node, x_shape, y_shape, self.consts[dq_w.input[0]].shape)
            self.shapes[out] = y_shape
            self.add("Conv[int8]", Step(lambda P: f"dl_conv2d_s8(&{params}, {P(x)}, {xz}, {common}, {P(out)}, {yz}, "
                                                  f"{lo}, 127);", [x], [out]))
            return True
        k = wq.shape[1]
        rows = self.numel(x) // k
        def code(P):
            call = f"dl_fc_s8({P(x)}{{}}, {xz}, {common}, {P(out)}{{}}, {yz}, {k}, {n_out}, {lo}, 127);"
            if rows == 1:
                return call.format("", "")
            return f"for (int32_t r = 0; r < {rows}; ++r) " + call.format(f" + r * {k}", f" + r * {n_out}")
        self.add(f"{node.op_type}[int8]", Step(code, [x], [out]))
        return True

    def _try_int8_binary(self, node, code: int) -> bool:
        """DQ(a), DQ(b) of one shape -> Add/Sub/Mul [-> Relu] -> QuantizeLinear: one pass over the int8
        bytes (the residual add of a ResNet), without the two float copies."""
        dq_a, dq_b = self._dq_act(node.input[0]), self._dq_act(node.input[1])
        if dq_a is None or dq_b is None or code not in (0, 1, 2):
            return False
        n = self.numel(node.output[0])
        if self.numel(dq_a.input[0]) != n or self.numel(dq_b.input[0]) != n:
            return False
        relu, nxt = None, self.single_consumer(node.output[0])
        if nxt is not None and nxt.op_type == "Relu":
            relu, nxt = nxt, self.single_consumer(nxt.output[0])
        if nxt is None or nxt.op_type != "QuantizeLinear":
            return False
        (as_, az, _), (bs, bz, _), (ys, yz, _) = self.qp(dq_a), self.qp(dq_b), self.qp(nxt)
        a, b, out = dq_a.input[0], dq_b.input[0], nxt.output[0]
        lo = max(-128, yz) if relu is not None else -128
        self.skip.update(list(self.graph.node).index(m) for m in (relu, nxt) if m is not None)
        self.kind[out], self.qparams[out] = "q", (ys, yz)
        self.add(f"{node.op_type}[int8]", Step(
            lambda P: f"dl_binary_s8({P(a)}, {az}, {_float(as_)}, {P(b)}, {bz}, {_float(bs)}, {P(out)}, {n}, "
                      f"{_float(ys)}, {yz}, {lo}, 127, {code});", [a, b], [out], inplace=True))
        return True

    def _try_int8_pool(self, node) -> bool:
        dq_x = self._dq_act(node.input[0])
        nxt = self.single_consumer(node.output[0])
        if dq_x is None or nxt is None or nxt.op_type != "QuantizeLinear" or self.qp(dq_x)[:2] != self.qp(nxt)[:2]:
            return False
        params, x, out = self._pool(node), dq_x.input[0], nxt.output[0]
        self.skip.add(list(self.graph.node).index(nxt))
        self.kind[out], self.qparams[out] = "q", self.qparams.get(x, self.qp(nxt)[:2])
        self.add("MaxPool[int8]", Step(lambda P: f"dl_maxpool_s8(&{params}, {P(x)}, {P(out)});", [x], [out]))
        return True

