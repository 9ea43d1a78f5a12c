"""Which engine ``dlopt.onnx_backend.cpu`` keeps for a model (issue 28, item 3): the first whose
outputs match the ONNX reference implementation's, so that ``cpu`` passes wherever a raw
engine does (docs/conformance.md compares them case by case).

The cases come from the onnx wheel's backend test generators (cast, castlike, attention),
imported alone rather than through the whole suite; each runs on the real runtimes and is
checked with the suite's own comparison and tolerance.
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dlopt.targets import backend_status

needs = pytest.mark.skipif(any(backend_status(b) is not True for b in ("ort", "openvino")),
                           reason="the cpu backend's choice needs ONNX Runtime and OpenVINO")


@pytest.fixture(scope="module")
def node_cases() -> dict:
    import onnx.backend.test.case.node as node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for module in ("cast", "castlike", "attention"):  # importing a generator module makes its cases
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
    return {case.name: case for case in node._NodeTestCases}


def _run_case(case, backend):
    from onnx.backend.test.runner import Runner, _normalize_tensor

    rep = backend.prepare(case.model, "CPU")
    try:
        for inputs, outputs in case.data_sets:
            got = rep.run([_normalize_tensor(t) for t in inputs])
            Runner.assert_similar_outputs([_normalize_tensor(t) for t in outputs], got, case.rtol, case.atol)
        return rep.engine.chosen, dict(rep.engine.reasons)
    finally:
        rep.close()


@needs
@pytest.mark.parametrize("name, engine, reason", [
    # ONNX Runtime runs it first and is one fp16 ulp off the reference in one element: OpenVINO matches
    ("test_attention_4d_causal_fp16", "openvino", {"ort": "outputs differ from the ONNX reference"}),
    # dlopt's passes fold CastLike into a Cast without saturate=0; the reference runs the model as given
    ("test_castlike_no_saturate_FLOAT_to_FLOAT8E4M3FN", "openvino", {"ort": "outputs differ from the ONNX reference"}),
    # ONNX Runtime's Python API takes no 4-bit input: OpenVINO runs these
    ("test_cast_INT4_to_FLOAT", "openvino", {"ort": "can't be converted to MLDataType"}),
    ("test_castlike_UINT4_to_UINT8_expanded", "openvino", {"ort": "can't be converted to MLDataType"}),
    ("test_cast_FLOAT8E4M3FN_to_FLOAT", "ort", {}),
])
def test_cpu_keeps_the_engine_that_matches_the_reference(node_cases, name, engine, reason):
    import dlopt.onnx_backend.cpu as cpu

    chosen, reasons = _run_case(node_cases[name], cpu)
    assert chosen == engine
    for backend, text in reason.items():
        assert text in reasons[backend]


@needs
def test_undefined_cast_is_the_one_exception(node_cases):
    """Float to int4 out of range is undefined in ONNX (Cast: "fixed point: undefined if OOR"):
    OpenVINO wraps 8 to -8, the reference (ml_dtypes) gives 0; no other engine takes int4,
    so OpenVINO's wrap is returned and the in-range values are exact."""
    import dlopt.onnx_backend.cpu as cpu
    from onnx.backend.test.runner import _normalize_tensor

    case = node_cases["test_cast_FLOAT_to_INT4"]
    (inputs, outputs), = case.data_sets
    x, want = _normalize_tensor(inputs[0]), _normalize_tensor(outputs[0])
    rep = cpu.prepare(case.model)
    try:
        (got,) = rep.run([x])
        assert rep.engine.chosen == "openvino"
        assert "differ from the ONNX reference" in rep.engine.reasons["openvino"]
    finally:
        rep.close()
    inside = (x >= -8) & (x <= 7)
    np.testing.assert_array_equal(got[inside].astype(np.int8), want[inside].astype(np.int8))
    np.testing.assert_array_equal(got[x == 8].astype(np.int8), [-8])


def test_reference_is_asked_only_about_small_models():
    from onnx_ir import serde

    from dlopt.onnx_backend import reference

    def model(weights: int) -> onnx.ModelProto:
        w = helper.make_tensor("w", TensorProto.FLOAT, [weights], np.ones(weights, np.float32))
        graph = helper.make_graph([helper.make_node("ReduceSum", ["w"], ["y"], keepdims=0)], "g", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    (y,) = reference.outputs(serde.deserialize_model(model(1000)), {})
    assert float(y) == 1000.0
    assert reference.outputs(serde.deserialize_model(model(reference.MAX_ELEMENTS + 1)), {}) is None
    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])]), opset_imports=[helper.make_opsetid("", 13)])
    (y,) = reference.outputs(serde.deserialize_model(relu), {"x": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(y, [0.0, 2.0])
    big = {"x": np.zeros(reference.MAX_ELEMENTS + 1, np.float32)}
    assert reference.outputs(serde.deserialize_model(relu), big) is None  # inputs too large to ask it
    assert reference.matches([np.float32(1000.5)], [np.float32(1000.0)])  # within rtol 1e-3
    assert not reference.matches([np.float32(1002.0)], [np.float32(1000.0)])
