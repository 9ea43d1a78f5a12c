"""FoldBatchNormPass: fold inference-mode BatchNormalization into the op before it."""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from dlopt.passes._rules import RulesPass

logger = logging.getLogger(__name__)

_NOTE_ITEMS = 5  # BatchNorms named in the note (the report's pass table); the log names all


class FoldBatchNormPass(RulesPass):
    """Rewrite ``BatchNormalization(Conv|ConvTranspose|Gemm(x))`` as one Conv/ConvTranspose/Gemm.

    Guarantees: the producer's weights and bias are rescaled so the output is the
    same (computed in float64, stored in the weights' dtype); the folded node gets
    weight and bias initializers of its own under new names, so a weight or bias
    shared with other nodes (torch's exporter gives a stride-2 conv and its 1x1
    shortcut one zero bias) is folded too and the other nodes keep the original; a
    producer without a bias gets one; a producer whose output feeds only BatchNorms (onnxsim
    merges twin convolutions) is copied so each folds. Initializers the fold leaves unused
    are removed; a BatchNorm whose producer's output is also read by other ops stays.
    ``unfolded`` lists ``(node name, reason)`` for every BatchNormalization left, and
    ``note`` says how many were folded and why the rest were not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unfolded: list[tuple[str, str]] = []
        self._taken: set[str] = set()

    def rules(self) -> list:
        from onnxscript.rewriter import RewriteRule

        return [RewriteRule(r.pattern, r.rewrite, r.check, name=r.name)
                for r in (cls(self._taken) for cls in _RULES.values())]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._taken = _value_names(model)
        copies = _split_shared_producers(model, self._taken)
        params = _params_of_candidates(model)
        result = super().call(model)
        if copies:
            self.note += f" ({copies} producer(s) copied: their output fed several BatchNorms)"
        for graph, value in params:
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                graph.initializers.pop(value.name, None)
        self.unfolded = [(bn.name or bn.outputs[0].name, _why_not(bn)) for bn in _batchnorms(model)]
        if self.unfolded:
            left = [f"{name}: {reason}" for name, reason in self.unfolded]
            logger.info("FoldBatchNormPass left %d BatchNormalization(s): %s", len(left), "; ".join(left))
            more = f"; and {len(left) - _NOTE_ITEMS} more" if len(left) > _NOTE_ITEMS else ""
            folded = f"{self.note}; " if self.note else ""
            self.note = (f"{folded}{len(left)} BatchNormalization(s) not folded: "
                         f"{'; '.join(left[:_NOTE_ITEMS])}{more}")
        return result


def _batchnorms(model: ir.Model) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph)
            if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]


def _value_names(model: ir.Model) -> set[str]:
    """Every value name of the model, subgraphs included: new initializers must not reuse one."""
    names = {v.name for v in (*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values())}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        names.update(v.name for v in (*node.inputs, *node.outputs) if v is not None)
    return names


def _split_shared_producers(model: ir.Model, taken: set[str]) -> int:
    """Give each BatchNorm its own copy of a Conv/ConvTranspose/Gemm whose output feeds only BatchNorms.

    onnxsim merges identical convolutions (same input, same shared weight) into one that feeds
    two BatchNorms; after a copy each folds, and the model computes as many convolutions as
    before. Copies are made only where every BatchNorm would fold.
    """
    copies = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type not in _RULES or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        users = [user for user, _ in uses]
        if (len(uses) < 2 or out.is_graph_output() or len(set(users)) != len(users)
                or any(u.op_type != "BatchNormalization" or i != 0 for u, i in uses)):
            continue
        rule = _RULES[node.op_type](taken)
        if not all(rule.check(None, node.inputs[0], out, bn.outputs[0]) for bn in users):
            continue
        for i, bn in enumerate(users[1:], start=1):
            copy = ir.Node(node.domain, node.op_type, list(node.inputs), list(node.attributes.values()),
                           num_outputs=1, name=f"{node.name}_copy{i}")
            copy.outputs[0].name = rule.new_name(f"{out.name}_copy{i}")
            copy.outputs[0].type, copy.outputs[0].shape = out.type, out.shape
            node.graph.insert_after(node, copy)
            bn.replace_input_with(0, copy.outputs[0])
            copies += 1
    return copies


def _params_of_candidates(model: ir.Model) -> list[tuple[ir.Graph, ir.Value]]:
    """Initializers of BatchNorms and of their producers: the fold may leave them unused."""
    found = []
    for bn in _batchnorms(model):
        src = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        values = [*bn.inputs[1:], *(src.inputs[1:] if src is not None and src.op_type in _RULES else [])]
        found += [(bn.graph, v) for v in values
                  if v is not None and v.is_initializer() and bn.graph.initializers.get(v.name) is v]
    return found


def _why_not(bn: ir.Node) -> str:
    """Why ``bn`` was not folded, in a few words."""
    value = bn.inputs[0]
    src = value.producer() if value is not None else None
    if src is None:
        return f"its input '{value.name if value is not None else ''}' is not computed by a Conv/ConvTranspose/Gemm"
    if src.op_type not in _RULES or src.domain not in ("", "ai.onnx"):
        return f"its input comes from {src.op_type} '{src.name}', not Conv/ConvTranspose/Gemm"
    if len(value.uses()) > 1 or value.is_graph_output():
        return f"the {src.op_type} output '{value.name}' is also used elsewhere"
    result = _RULES[src.op_type](set()).check(None, src.inputs[0], value, bn.outputs[0])
    return result.reason or "the rewriter did not match it"


def _constant(value: ir.Value | None, role: str) -> str:
    """Why ``value`` cannot be folded, or ''."""
    if value is None or not value.is_initializer() or value.const_value is None:
        return f"{role} '{value.name if value is not None else ''}' is not a constant initializer"
    if value.is_graph_input():
        return f"{role} '{value.name}' is a graph input (it can be overridden at run time)"
    return ""


class _FoldInto:
    """``BatchNormalization(<op_type>(x, W[, B]))`` -> ``<op_type>(x, W', B')`` with new initializers.

    The pattern/check/rewrite of an onnxscript ``RewriteRule``, kept free of onnxscript
    imports at module level (about 1 s) so that importing dlopt.passes stays light.
    """

    op_type: ClassVar[str]

    def __init__(self, taken: set[str]) -> None:
        self.name = f"FoldBatchNormInto{self.op_type}"
        self._taken = taken  # value names in use, shared by the rules of one pass run

    def pattern(self, op, x):
        producer = getattr(op, self.op_type)(x, _allow_other_inputs=True, _outputs=["inbound_out"])
        return op.BatchNormalization(producer, _allow_other_inputs=True, _outputs=["batchnorm_out"])

    def check(self, context, x, inbound_out: ir.Value, batchnorm_out: ir.Value):
        from onnxscript.rewriter import MatchResult

        result = MatchResult()
        producer, bn = inbound_out.producer(), batchnorm_out.producer()
        if bn.attributes.get_int("training_mode", 0) or any(o.uses() for o in bn.outputs[1:]):
            return result.fail("training mode (running statistics are outputs)")
        if len(bn.inputs) < 5:
            return result.fail("BatchNormalization lacks scale/bias/mean/var")
        checks = [_constant(producer.inputs[1] if len(producer.inputs) > 1 else None, "weight")]
        if len(producer.inputs) > 2 and producer.inputs[2] is not None:
            checks.append(_constant(producer.inputs[2], "bias"))
        checks += [_constant(v, role) for v, role in zip(bn.inputs[1:5], ("scale", "B", "mean", "var"))]
        reason = next((c for c in checks if c), "")
        if reason:
            return result.fail(reason)
        reason = self.shape_problem(producer, bn)
        return result.fail(reason) if reason else result

    def shape_problem(self, producer: ir.Node, bn: ir.Node) -> str:
        return ""

    def scale_weights(self, weights: np.ndarray, scale: np.ndarray, node: ir.Node) -> np.ndarray:
        raise NotImplementedError

    def rewrite(self, op, x, inbound_out: ir.Value, batchnorm_out: ir.Value):
        producer, bn = inbound_out.producer(), batchnorm_out.producer()
        gamma, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:5])
        eps = bn.attributes.get_float("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        w_value = producer.inputs[1]
        weights = w_value.const_value.numpy()
        attributes = dict(producer.attributes)
        # Gemm scales its bias by "beta" (default 1): fold that in and drop the attribute.
        gemm_beta = attributes.pop("beta").as_float() if "beta" in attributes else 1.0
        b_value = producer.inputs[2] if len(producer.inputs) > 2 else None
        bias = b_value.const_value.numpy().astype(np.float64) if b_value is not None else 0.0
        fused_w = self.scale_weights(weights.astype(np.float64), scale, producer).astype(weights.dtype)
        fused_b = ((gemm_beta * bias - mean) * scale + beta).astype(weights.dtype)
        w_name = self.new_name(f"{w_value.name}_bnfold")
        b_name = self.new_name(f"{b_value.name if b_value is not None else w_value.name + '_bias'}_bnfold")
        out = op.op(self.op_type, x, op.initializer(ir.tensor(fused_w), name=w_name),
                    op.initializer(ir.tensor(fused_b), name=b_name), **attributes)
        out.producer().name = producer.name  # it replaces the producer: reports and exclusions name it so
        return out

    def new_name(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name


def _broadcast(scale: np.ndarray, rank: int, axis: int) -> np.ndarray:
    return scale.reshape([-1 if i == axis else 1 for i in range(rank)])


class _FoldIntoConv(_FoldInto):
    op_type = "Conv"

    def scale_weights(self, weights, scale, node):
        return weights * _broadcast(scale, weights.ndim, 0)  # W: [out, in/group, *kernel]


class _FoldIntoConvTranspose(_FoldInto):
    op_type = "ConvTranspose"

    def shape_problem(self, producer, bn):
        in_channels = producer.inputs[1].const_value.shape[0]
        group = producer.attributes.get_int("group", 1)
        return "" if in_channels % group == 0 else f"in_channels {in_channels} is not divisible by group {group}"

    def scale_weights(self, weights, scale, node):
        # W: [in, out/group, *kernel]; output channel g*out/group + j is W[g*in/group:(g+1)*in/group, j]
        group = node.attributes.get_int("group", 1)
        c_in, c_out_g, kernel = weights.shape[0], weights.shape[1], weights.shape[2:]
        w = weights.reshape(group, c_in // group, c_out_g, *kernel)
        s = scale.reshape(group, 1, c_out_g, *(1,) * len(kernel))
        return (w * s).reshape(weights.shape)


class _FoldIntoGemm(_FoldInto):
    op_type = "Gemm"

    def scale_weights(self, weights, scale, node):
        axis = 0 if node.attributes.get_int("transB", 0) else 1  # B: [K, N], or [N, K] when transposed
        return weights * _broadcast(scale, weights.ndim, axis)


_RULES: dict[str, type[_FoldInto]] = {r.op_type: r for r in (_FoldIntoConv, _FoldIntoConvTranspose, _FoldIntoGemm)}
