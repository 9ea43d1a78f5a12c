"""MatMulAddToGemmPass: turn 2-D ``Add(MatMul(a, b), c)`` into one Gemm."""

from __future__ import annotations

from dlopt.passes._rules import RulesPass


class MatMulAddToGemmPass(RulesPass):
    """Rewrite rank-2 ``Add(MatMul(a, b), c)`` (with optional transposes) as ``Gemm``.

    Guarantees: only inputs of known rank 2 are rewritten, where Gemm's semantics
    equal MatMul+Add exactly; higher-rank (batched) MatMuls stay as they are.
    """

    def rules(self) -> list:
        from onnxscript.rewriter.rules.common import (
            matmul_add_to_gemm_rule,
            transpose_a_matmul_add_to_gemm_rule,
            transpose_ab_matmul_add_to_gemm_rule,
            transpose_b_matmul_add_to_gemm_rule,
        )

        return [
            matmul_add_to_gemm_rule,
            transpose_a_matmul_add_to_gemm_rule,
            transpose_b_matmul_add_to_gemm_rule,
            transpose_ab_matmul_add_to_gemm_rule,
        ]
