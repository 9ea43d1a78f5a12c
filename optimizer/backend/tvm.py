"""ONNX backend API over dlopt's tvm backend: Apache TVM (Relax, llvm), built at the first run
for the inputs' shapes, with shape inputs bound and shapes folded."""

from dlopt.backend._api import DloptBackend, DloptRep


class TvmBackend(DloptBackend):
    target = "tvm"


prepare = TvmBackend.prepare
run_model = run = TvmBackend.run_model
run_node = TvmBackend.run_node
supports_device = TvmBackend.supports_device
is_compatible = TvmBackend.is_compatible

__all__ = ["TvmBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
