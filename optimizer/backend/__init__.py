"""dlopt's backends as ONNX backends (``onnx.backend.base``), for the ONNX backend test suite.

``dlopt.backend.ort``, ``dlopt.backend.openvino`` and ``dlopt.backend.tvm`` each run a
model through one dlopt backend; ``dlopt.backend.cpu`` picks, per model, a backend of
the ``cpu`` profile that runs it correctly: its outputs match the ONNX reference
implementation's (small models) or, where that cannot run the model, ONNX Runtime's.
Each module offers ``prepare``, ``run_model`` (also as ``run``), ``run_node``,
``supports_device`` and ``is_compatible``, as ``onnxruntime.backend`` does::

    import dlopt.backend.openvino as backend
    rep = backend.prepare(onnx_model, "CPU")
    outputs = rep.run([x])

See docs/conformance.md for how each passes the ONNX backend test suite.
"""

BACKENDS = ("ort", "openvino", "tvm", "cpu")
