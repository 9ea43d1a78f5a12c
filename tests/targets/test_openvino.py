"""OpenVINO backend on real OpenVINO, checked against ONNX Runtime on the same inputs."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino package (dlopt[openvino])")

import models  # noqa: E402
from helpers import max_rel_error, run_ort  # noqa: E402

from dlopt.core.errors import CompileError  # noqa: E402
from dlopt.core.profiles import host_arch, resolve_target  # noqa: E402
from dlopt.targets import openvino as ov_backend  # noqa: E402

CPU = resolve_target("cpu")
needs_x86 = pytest.mark.skipif(host_arch() != "x86_64", reason="dlopt builds OpenVINO artefacts for x86-64 CPUs only")


def _conv_model() -> ir.Model:
    return ir.serde.deserialize_model(models.conv_bn_relu(channels=16, size=32, batch="N"))


def _feeds(seed: int, n: int = 5, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


def _worst_error(reference_model, session, feeds) -> float:
    return max(max_rel_error(run_ort(reference_model, f)[0], session.run(f)[0]) for f in feeds)


def _f16_constants(xml: str) -> int:
    return len(re.findall(r'type="Const"[^>]*>\s*<data[^>]*element_type="f16"', xml))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """fp32 and fp16 artefacts of the same conv model, each loaded once."""
    tmp = tmp_path_factory.mktemp("openvino")
    out = {}
    for precision in ("fp32", "fp16"):
        artifact = ov_backend.BACKEND.compile(_conv_model(), CPU, tmp / precision, precision=precision, threads=2)
        out[precision] = artifact, ov_backend.BACKEND.load(artifact)
    return out


@needs_x86
def test_fp32_matches_onnxruntime_and_runs_in_fp32(built):
    artifact, session = built["fp32"]
    assert sorted(p.name for p in artifact.folder.iterdir()) == ["model.bin", "model.xml", "runtime_config.json"]
    assert artifact.entry == "model.xml" and artifact.loadable_here
    saved = json.loads((artifact.folder / "runtime_config.json").read_text())
    assert saved == artifact.settings
    assert saved["properties"] == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": 1}
    assert session.input_names == ["x"]
    assert session.ran_as == "fp32"
    assert _f16_constants(artifact.entry_path.read_text()) == 0
    assert _worst_error(models.conv_bn_relu(channels=16, size=32, batch="N"), session, _feeds(1)) <= 1e-4


@needs_x86
def test_fp16_stores_f16_weights_and_stays_close(built):
    artifact, session = built["fp16"]
    assert _f16_constants(artifact.entry_path.read_text()) >= 2  # conv and dense weights
    fp32_bin = (built["fp32"][0].folder / "model.bin").stat().st_size
    assert (artifact.folder / "model.bin").stat().st_size < 0.6 * fp32_bin
    # The CPU plugin decompresses f16 weights and computes in f32, and says so.
    assert session.ran_as == "fp32"
    assert _worst_error(models.conv_bn_relu(channels=16, size=32, batch="N"), session, _feeds(2)) <= 1e-2


@needs_x86
def test_bf16_candidate_runs_in_bf16(tmp_path):
    if "bf16" not in ov_backend.BACKEND.precisions(CPU):
        pytest.skip("this CPU has no bf16 support (AMX / AVX512-BF16), so OpenVINO offers no bf16 candidate")
    artifact = ov_backend.BACKEND.compile(_conv_model(), CPU, tmp_path, precision="bf16", threads=2)
    session = ov_backend.BACKEND.load(artifact)
    assert artifact.settings["properties"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert session.ran_as == "bf16"
    error = _worst_error(models.conv_bn_relu(channels=16, size=32, batch="N"), session, _feeds(3))
    assert 1e-5 < error <= 5e-2  # visibly not fp32, still close


@needs_x86
def test_without_the_explicit_hint_openvino_would_run_fp32_ir_in_bf16(built):
    """Why the hint is never left implicit: on bf16-capable CPUs the default is bf16."""
    if "bf16" not in ov_backend.BACKEND.precisions(CPU):
        pytest.skip("the implicit bf16 default only exists on CPUs with bf16 support")
    artifact, _ = built["fp32"]
    compiled = ov_backend._core().compile_model(str(artifact.entry_path), "CPU", {})
    assert ov_backend.ran_as(compiled) == "bf16"


@needs_x86
def test_int8_and_mixed_from_qdq_match_onnxruntime_and_report_what_ran(tmp_path):
    from dlopt.passes import FoldBatchNormPass
    from dlopt.passes.quantize_static import QuantizeStaticPass
    from dlopt.flow.ranges import compute_ranges

    model = FoldBatchNormPass()(_conv_model()).model
    ranges = tmp_path / "calibration.json"
    compute_ranges(ir.serde.serialize_model(model), _feeds(0, n=8), ranges)
    # OpenVINO's int8 kernels on x86 CPUs without VNNI add u8 x s8 pairs in 16 bits and saturate with full
    # 8-bit weights (0.15 off ONNX Runtime's exact kernels on an AVX2-only EPYC): 7-bit weights there, as
    # dlopt's own OpenVINO candidates get them
    reduce_range = CPU.int8_pairs_saturate()
    qdq = QuantizeStaticPass(ranges=ranges, reduce_range=reduce_range)(model).model
    artifact = ov_backend.BACKEND.compile(qdq, CPU, tmp_path / "int8", precision="int8", threads=2)
    session = ov_backend.BACKEND.load(artifact)
    assert artifact.settings["properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov_backend.executed_precisions(session.compiled) == {"i8"}
    assert session.ran_as == "int8"
    # Same QDQ model on both runtimes: only rounding of the float parts differs.
    assert _worst_error(qdq, session, _feeds(4)) <= 1e-3

    conv = next(n.name for n in model.graph if n.op_type == "Conv")
    mixed = QuantizeStaticPass(ranges=ranges, only_nodes=[conv], reduce_range=reduce_range)(model).model  # dense layer stays float
    session = ov_backend.BACKEND.load(ov_backend.BACKEND.compile(mixed, CPU, tmp_path / "mixed", precision="mixed", threads=2))
    assert ov_backend.executed_precisions(session.compiled) == {"i8", "f32"}
    assert session.ran_as == "mixed"
    assert _worst_error(mixed, session, _feeds(5)) <= 1e-3


def _custom_op_model(nested: bool):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    foo = helper.make_node("Foo", ["x"], ["f"], domain="com.example")
    if nested:  # the unknown op sits inside an If branch
        then = helper.make_graph([foo], "then", [], [helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 4])])
        other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [],
                                  [helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 4])])
        cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
        nodes, inputs = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], [x, cond]
    else:
        nodes, inputs = [foo, helper.make_node("Relu", ["f"], ["y"])], [x]
    graph = helper.make_graph(nodes, "custom", inputs, [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def test_supports_names_ops_the_onnx_frontend_cannot_convert():
    assert ov_backend.BACKEND.supports(_conv_model()) == []
    assert ov_backend.BACKEND.supports(_custom_op_model(nested=False)) == ["com.example.Foo"]
    assert ov_backend.BACKEND.supports(_custom_op_model(nested=True)) == ["com.example.Foo"]


def test_compile_turns_a_converter_failure_into_a_compile_error(tmp_path):
    with pytest.raises(CompileError, match="com.example.Foo"):
        ov_backend.BACKEND.compile(_custom_op_model(nested=False), CPU, tmp_path, precision="fp32", threads=1)
    assert list(tmp_path.iterdir()) == []  # the ONNX handed to the converter is gone


def test_precisions_only_for_x86_cpu_profiles():
    for target in ("arm64", "rpi5", "jetson-orin", "nvidia-gpu", "cortex-m7"):
        assert ov_backend.BACKEND.precisions(resolve_target(target)) == (), target
    assert set(ov_backend.BACKEND.precisions(resolve_target("x86-avx2"))) >= {"fp32", "fp16", "int8", "mixed"}


@needs_x86
def test_compile_end_to_end_reports_an_openvino_fp32_candidate(tmp_path, monkeypatch):
    import dlopt
    from dlopt import targets

    monkeypatch.setitem(targets.BACKEND_MODULES, "openvino", "dlopt.targets.openvino")  # the registry entry
    report = dlopt.compile(models.conv_bn_relu(channels=16, size=32, batch=2), target="cpu",
                           out=tmp_path / "o", precision="fp32", runs=5)
    row = next(c for c in report.candidates if c.key == "openvino/fp32")
    assert row.status == "ok", row.reason
    assert row.ran_as == "fp32"
    assert row.fidelity.max_rel_error <= 1e-4
    assert row.measurement.latency is not None


def test_the_converter_leaves_the_root_logger_as_it_was(tmp_path):
    import logging

    root = logging.getLogger()
    before = (root.level, list(root.filters), list(root.handlers))
    with pytest.raises(CompileError):
        ov_backend.BACKEND.compile(_custom_op_model(nested=False), CPU, tmp_path, precision="fp32", threads=1)
    ov_backend.BACKEND.compile(ir.serde.deserialize_model(models.conv_bn_relu()), CPU, tmp_path / "ok", precision="fp32",
                       threads=1)
    assert (root.level, list(root.filters), list(root.handlers)) == before


@needs_x86
def test_declared_shape_runs_on_a_static_copy_and_other_shapes_still_run(tmp_path):
    model = _conv_model()  # batch "N"
    artifact = ov_backend.BACKEND.compile(model, CPU, tmp_path, precision="fp32", threads=2, shapes={"x": (2, 3, 32, 32)})
    settings = json.loads((tmp_path / "runtime_config.json").read_text())
    assert settings["static_shape"] == {"x": [2, 3, 32, 32]}
    session = ov_backend.BACKEND.load(artifact)
    assert session._static is not None
    for batch in (2, 5):  # the declared shape (static copy) and another (dynamic model)
        feed = _feeds(3, 1, batch)[0]
        assert max_rel_error(run_ort(model, feed)[0], session.run(feed)[0]) < 1e-4
    # a model without symbolic dims has nothing to make static
    fixed = ir.serde.deserialize_model(models.conv_bn_relu(channels=16, size=32, batch=2))
    ov_backend.BACKEND.compile(fixed, CPU, tmp_path / "fixed", precision="fp32", threads=2, shapes={"x": (2, 3, 32, 32)})
    assert "static_shape" not in json.loads((tmp_path / "fixed" / "runtime_config.json").read_text())


def test_an_op_that_failed_to_convert_inside_a_branch_says_why_instead_of_unsupported():
    """A Conv in an If branch fed a tensor of unknown rank has a conversion rule: the converter failed
    (rank unknown), which 'unsupported ops: Conv, ReduceMean' used to hide."""
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")
    then_g = helper.make_graph([helper.make_node("Conv", ["h", "w"], ["t"], pads=[1] * 4),
                                helper.make_node("ReduceMean", ["t"], ["t2"], axes=[2, 3])], "then", [],
                               [helper.make_tensor_value_info("t2", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Reshape", ["x", "shp"], ["h"]), helper.make_node("Greater", ["sr", "thr"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
                                           helper.make_tensor_value_info("sr", TensorProto.INT64, []),
                                           helper.make_tensor_value_info("shp", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w, numpy_helper.from_array(np.array(5, np.int64), "thr")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert ov_backend.BACKEND.supports(model) == ["Conv (converter failed: The input data tensor's rank has to be known "
                                          "(static))", "ReduceMean (converter failed: Unsupported input type dynamic)"]
