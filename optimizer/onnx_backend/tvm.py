"""ONNX backend API over dlopt's tvm backend: Apache TVM (Relax, llvm), built at the first run
for the inputs' shapes, with shape inputs bound and shapes folded."""

from dlopt.onnx_backend._api import DloptBackend, DloptRep


class TvmOnnxBackend(DloptBackend):
    target = "tvm"


prepare = TvmOnnxBackend.prepare
run_model = run = TvmOnnxBackend.run_model
run_node = TvmOnnxBackend.run_node
supports_device = TvmOnnxBackend.supports_device
is_compatible = TvmOnnxBackend.is_compatible

__all__ = ["TvmOnnxBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
