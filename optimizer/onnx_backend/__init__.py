"""dlopt's backends as ONNX backends (``onnx.backend.base``), for the ONNX backend test suite.

``dlopt.onnx_backend.ort``, ``dlopt.onnx_backend.openvino`` and ``dlopt.onnx_backend.tvm`` each run a
model through one dlopt backend; ``dlopt.onnx_backend.cpu`` picks, per model, a backend of
the ``cpu`` profile that runs it correctly: its outputs match the ONNX reference
implementation's (small models) or, where that cannot run the model, ONNX Runtime's.
Each module offers ``prepare``, ``run_model`` (also as ``run``), ``run_node``,
``supports_device`` and ``is_compatible``, as ``onnxruntime.backend`` does::

    import dlopt.onnx_backend.openvino as backend
    rep = backend.prepare(onnx_model, "CPU")
    outputs = rep.run([x])

See docs/conformance.md for how each passes the ONNX backend test suite.
"""

BACKENDS = ("ort", "openvino", "tvm", "cpu")
