"""Graph passes of dlopt, one per file, and the pipelines built from them.

Generic passes produce standard ONNX any backend can take; a backend adds passes of
its own after them (``Backend.lowering_passes``, e.g. ORT's contrib fusions): this
package knows no backend by name.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    ShapeInferencePass,
)

from dlopt.core.graph_facts import has_sequences, has_subgraphs
from dlopt.passes.fold_batchnorm import FoldBatchNormPass
from dlopt.passes.fold_constants import FoldConstantsPass
from dlopt.passes.matmul_add_to_gemm import MatMulAddToGemmPass
from dlopt.passes.ort_fuse_activation import FuseActivationForOrtPass
from dlopt.passes.prune_magnitude import MagnitudePrunePass
from dlopt.passes.simplify import SimplifyPass
from dlopt.passes.upgrade_opset import UpgradeOpsetPass

__all__ = [
    "FoldBatchNormPass",
    "FoldConstantsPass",
    "FuseActivationForOrtPass",
    "MagnitudePrunePass",
    "MatMulAddToGemmPass",
    "SimplifyPass",
    "UpgradeOpsetPass",
    "generic_passes",
]


def generic_passes(*, prune: float | None = None, model: ir.Model | None = None) -> list[ir.passes.PassBase]:
    """Check, infer shapes, simplify and fuse: output is standard ONNX for every backend.

    ``prune``: zero that fraction of each layer's smallest weights (:class:`MagnitudePrunePass`),
    after BatchNorm folding so the zeros are the weights the backends see.  ``model``: the model
    the passes are for; with control flow or sequences, onnx-ir's shape inference and identity
    elimination are left out: the first types sequence values as tensors (ONNX Runtime then
    refuses the model), the second lets a Scan body return one value twice, which ONNX Runtime's
    Scan answers with uninitialised memory (found by the ONNX backend test suite, docs/conformance.md).
    """
    passes = [
        # below opset 13 per-channel quantisation cannot be expressed: convert (outputs checked) first
        UpgradeOpsetPass(),
        ShapeInferencePass(strict_mode=False),
        SimplifyPass(),
        IdentityEliminationPass(),  # also covers models too big for onnxsim
        FoldConstantsPass(),
        RemoveUnusedNodesPass(),
        # onnxsim leaves folded values as Constant nodes (e.g. the zero bias torch's exporter gives a
        # bias-free Conv); BN folding and quantisation need them as initializers.
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        FoldBatchNormPass(),
        MatMulAddToGemmPass(),
        RemoveUnusedNodesPass(),
        RemoveUnusedOpsetsPass(),
        NameFixPass(),  # unique node names: quantisation excludes nodes by name
    ]
    if model is not None:
        if has_subgraphs(model) or has_sequences(model):
            passes = [p for p in passes if not isinstance(p, (ShapeInferencePass, IdentityEliminationPass))]
    if prune is not None:
        passes.insert(passes.index(next(p for p in passes if isinstance(p, MatMulAddToGemmPass))) + 1,
                      MagnitudePrunePass(sparsity=prune))
    return passes
