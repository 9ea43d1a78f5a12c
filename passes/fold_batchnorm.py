"""FoldBatchNormPass: fold inference-mode BatchNormalization into the op before it."""

from __future__ import annotations

from dlopt.passes._rules import RulesPass


class FoldBatchNormPass(RulesPass):
    """Rewrite ``BatchNormalization(Conv|ConvTranspose|Gemm(x))`` as one Conv/ConvTranspose/Gemm.

    Guarantees: the weights and bias of the producer are rescaled so the output is
    the same; a pattern is left alone when its weights are not constant
    initializers or are shared with other nodes (onnxscript's rule checks say so).
    """

    def rules(self) -> list:
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        return [
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        ]
