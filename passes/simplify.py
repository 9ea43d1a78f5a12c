"""SimplifyPass: constant folding and dead-node elimination through onnxsim."""

from __future__ import annotations

import logging

import onnx_ir as ir

from dlopt.errors import first_line

logger = logging.getLogger(__name__)

# onnxsim works on a serialised ModelProto, which protobuf caps at 2 GiB.
_MAX_PROTO_BYTES = 1_900_000_000


class SimplifyPass(ir.passes.FunctionalPass):
    """Fold constants, drop dead nodes and redundant ops with onnxsim.

    Guarantees: the returned model computes the same outputs (onnxsim's own
    optimisers only; BatchNormalization folding is left to ``FoldBatchNormPass``
    so the report attributes it).  If onnxsim cannot process the model (too big
    for one protobuf, an op it does not know) the model is returned unchanged and
    ``note`` says why: simplification is an optimisation, never a reason to fail.
    """

    def __init__(self, *, fold_batchnorm: bool = False) -> None:
        super().__init__()
        self.fold_batchnorm = fold_batchnorm
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxsim  # slow import (~1 s): only when the pass runs

        self.note = ""
        proto = ir.serde.serialize_model(model)
        if proto.ByteSize() > _MAX_PROTO_BYTES:
            self.note = "skipped: model over 1.9 GB cannot go through onnxsim"
            return ir.passes.PassResult(model.clone(), False)
        try:
            simplified, _ = onnxsim.simplify(
                proto, check_n=0, skip_fuse_bn=not self.fold_batchnorm
            )
        except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++
            self.note = f"skipped: onnxsim failed ({first_line(exc)})"
            logger.warning("SimplifyPass %s", self.note)
            return ir.passes.PassResult(model.clone(), False)
        new_model = ir.serde.deserialize_model(simplified)
        modified = simplified.SerializeToString(deterministic=True) != proto.SerializeToString(
            deterministic=True
        )
        return ir.passes.PassResult(new_model, modified)
