"""Plain ONNX-backend wrappers around the engines, without dlopt: the baseline of bench/conformance.py.

``python bench/conformance.py --backends raw-ort,raw-openvino,raw-tvm ...`` runs the suite on
these, to reproduce the raw-engine figures of issue 17 on this machine:

* ``raw-ort``: ``onnxruntime.backend`` as ONNX Runtime ships it.
* ``raw-openvino``: ``Core.read_model`` of the ONNX bytes, compiled for CPU with an f32 hint;
  feeds by name, outputs copied out.
* ``raw-tvm``: ``tvm.relax.frontend.onnx.from_onnx`` with the feeds' shapes and dtypes, built
  for ``llvm`` with the default Relax pipeline, run in the Relax VM; built at the first run.
"""

from __future__ import annotations

import numpy as np
from onnx.backend.base import Backend, BackendRep


class _Raw(Backend):
    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


class _OpenVinoRep(BackendRep):
    def __init__(self, model) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32"})
        initializers = {t.name for t in model.graph.initializer}
        self.names = [v.name for v in model.graph.input if v.name not in initializers]

    def run(self, inputs, **kwargs):
        request = self.compiled.create_infer_request()
        known = {n for port in self.compiled.inputs for n in port.get_names()}
        request.infer({k: np.asarray(v) for k, v in zip(self.names, inputs) if k in known})
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]


class RawOpenVino(_Raw):
    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs):
        return _OpenVinoRep(model)


class _TvmRep(BackendRep):
    def __init__(self, model) -> None:
        initializers = {t.name for t in model.graph.initializer}
        self.model = model
        self.names = [v.name for v in model.graph.input if v.name not in initializers]
        self.vm = None

    def run(self, inputs, **kwargs):
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        arrays = [np.asarray(v) for v in inputs]
        if self.vm is None:
            mod = from_onnx(self.model, shape_dict={n: list(a.shape) for n, a in zip(self.names, arrays)},
                            dtype_dict={n: str(a.dtype) for n, a in zip(self.names, arrays)},
                            keep_params_in_input=False)
            executable = relax.build(mod, target="llvm")
            self.vm = relax.VirtualMachine(executable, tvm.cpu())
        out = self.vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        return _flatten(out)


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [array for item in value for array in _flatten(item)]


class RawTvm(_Raw):
    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs):
        return _TvmRep(model)


def raw_backend(name: str):
    """The wrapper called ``name`` (raw-ort, raw-openvino, raw-tvm)."""
    if name == "raw-ort":
        import onnxruntime.backend

        return onnxruntime.backend
    return {"raw-openvino": RawOpenVino, "raw-tvm": RawTvm}[name]
