"""The microcontroller C backend: generated C99 built with the host gcc against ONNX Runtime,
cross-compiled with arm-none-eabi-gcc (-Wall -Werror, sizes, nm -u) and run under qemu-system-arm."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import dlopt
from dlopt.core.errors import CompileError, ModelError
from dlopt.core.config import McuOptions
from dlopt.core.profiles import resolve_target
from dlopt.targets import get_backend
from dlopt.targets.c.codegen import quantize_multiplier
from dlopt.targets.c.verify import ALLOWED_UNDEFINED, cross_tools, qemu_tools
from helpers import run_ort, run_session

C = get_backend("c")
needs_cross = pytest.mark.skipif(cross_tools() is not True, reason=str(cross_tools()))
needs_qemu = pytest.mark.skipif(qemu_tools() is not True, reason=str(qemu_tools()))


def small_cnn(seed: int = 0, size: int = 8) -> onnx.ModelProto:
    """Conv-Relu, MaxPool, Conv-Relu + residual Add, GlobalAveragePool, Reshape, Gemm, Softmax."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (4, 1, 3, 3), 0.5), init("b1", (4,), 0.1), init("w2", (4, 4, 3, 3), 0.3),
             init("b2", (4,), 0.1), init("fw", (10, 4), 0.5), init("fb", (10,), 0.1),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Add", ["r2", "p1"], ["a"], name="residual"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Reshape", ["g", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name="softmax")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _compile(proto, tmp_path, target="cortex-m7", precision="fp32", **options):
    return C.compile(ir.serde.deserialize_model(proto), resolve_target(target), tmp_path / f"{target}-{precision}",
                     precision=precision, threads=1, **options)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(target)``: the fp32 build of small_cnn() for that target, compiled once for the file (the
    cross build and the qemu run included); tests only read it."""
    root = tmp_path_factory.mktemp("c-builds")
    cache = {}

    def build(target: str):
        if target not in cache:
            cache[target] = _compile(small_cnn(), root, target=target)
        return cache[target]

    return build


def test_fp32_c_matches_onnx_runtime_with_a_tight_arena(built):
    proto = small_cnn()
    artifact = built("cortex-m7")
    folder = artifact.folder
    for name in ("model.c", "model.h", "dlopt_kernels.c", "dlopt_kernels.h", "Makefile", "dlopt_model.cmake",
                 "INTEGRATION.md", "c_build.json", "reference.onnx"):
        assert name in artifact.files and (folder / name).is_file()
    source = (folder / "model.c").read_text() + (folder / "dlopt_kernels.c").read_text()
    assert "malloc" not in source and "tvm" not in source.lower()
    assert "int dlopt_model_run(const float *input, float *output);" in (folder / "model.h").read_text()
    settings = json.loads((folder / "c_build.json").read_text())
    memory = settings["memory"]
    # input 1x8x8 stays in the caller's buffer; conv1 out 4x8x8 (1024 B) + pool out 4x4x4 (256 B) peak
    assert memory["liveness_lower_bound_bytes"] == 1280
    assert memory["arena_bytes"] <= 1.05 * memory["liveness_lower_bound_bytes"]
    assert settings["weights_bytes"] == 4 * (36 + 4 + 144 + 4 + 40 + 10)
    x = np.random.default_rng(1).standard_normal((6, 1, 8, 8)).astype(np.float32)
    got = run_session(C.load(artifact), [{"x": x}])[0][0]
    want = run_ort(proto, {"x": x})[0]
    assert got.shape == want.shape == (6, 10)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_unsupported_op_is_named(tmp_path):
    node = helper.make_node("Erf", ["x"], ["y"], name="erf")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert C.supports(ir.serde.deserialize_model(proto)) == ["Erf"]
    assert C.supports(ir.serde.deserialize_model(small_cnn())) == []
    with pytest.raises(ModelError, match="op Erf .*not supported by the C backend"):
        _compile(proto, tmp_path)


def test_quantize_multiplier_is_tflites():
    assert quantize_multiplier(0.5) == (1 << 30, 0)
    mult, shift = quantize_multiplier(0.0123)
    assert 1 << 30 <= mult < 1 << 31 and abs(mult * 2.0 ** (shift - 31) - 0.0123) < 1e-11
    assert quantize_multiplier(0.0) == (0, 0)


def _berkeley_totals(size_output: str) -> tuple[int, int, int]:
    """text, data and bss summed over the objects in `arm-none-eabi-size` (Berkeley format) output."""
    rows = [line.split() for line in size_output.splitlines()[1:] if line.strip()]
    return tuple(sum(int(row[i]) for row in rows) for i in range(3))


@needs_cross
def test_cross_build_figures_and_symbols_for_m4_and_m7(built):
    for target in ("cortex-m4", "cortex-m7"):
        settings = built(target).settings
        figures = settings["figures"]
        assert set(figures["undefined_symbols"]) <= ALLOWED_UNDEFINED
        assert figures["bss_bytes"] == settings["memory"]["arena_bytes"]
        assert figures["rodata_bytes"] >= settings["weights_bytes"]
        text, data, bss = _berkeley_totals(figures["arm_none_eabi_size"])
        assert figures["flash_bytes"] == text + data  # the -A sections add up to what size's summary says
        assert figures["ram_bytes"] == bss + data + figures["stack_estimate_bytes"] > 1280
        assert "model.o" in figures["arm_none_eabi_size"] and "dlopt_kernels.o" in figures["arm_none_eabi_size"]


@needs_cross
def test_max_ram_and_max_flash_fail_the_build(tmp_path):
    with pytest.raises(CompileError, match=r"bytes of RAM .* over --max-ram 1024; the liveness lower bound is 1280"):
        _compile(small_cnn(), tmp_path, max_ram=1024)
    with pytest.raises(CompileError, match=r"bytes of flash .* over --max-flash 100"):
        _compile(small_cnn(), tmp_path / "b", max_flash=100)
    options = C.build_options(McuOptions(max_ram=4096), None, None, None, threads=1)
    assert options == {"max_ram": 4096, "cache:max_ram": 4096}


@needs_qemu
def test_qemu_image_matches_the_host_build_on_m7_and_m4(built):
    for target, board in (("cortex-m7", "mps2-an500"), ("cortex-m4", "mps2-an386")):
        qemu = built(target).settings["qemu"]
        assert qemu["board"] == board and qemu["samples"] == 3
        assert qemu["max_abs_diff"] <= 1e-5
        counts = qemu["instructions_per_run"]
        assert len(counts) == 3 and all(10_000 < n < 10_000_000 for n in counts)


def _qdq(proto, tmp_path, calib: np.ndarray) -> onnx.ModelProto:
    """ONNX Runtime's static QDQ quantiser with dlopt's settings (per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(proto, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True})
    return onnx.load(dst)


def test_int8_kernels_agree_with_onnx_runtime_on_the_qdq_model(tmp_path):
    rng = np.random.default_rng(3)
    float_model = small_cnn(seed=2)
    qdq = _qdq(float_model, tmp_path, rng.standard_normal((32, 1, 8, 8)).astype(np.float32))
    artifact = _compile(qdq, tmp_path, precision="int8")
    ops = artifact.settings["ops"]
    assert ops["Conv[int8]"] == 2 and ops["Gemm[int8]"] == 1
    assert artifact.settings["weights_bytes"] < 4 * (36 + 144 + 40)  # int8 weights, int32 bias/multipliers
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    got = run_session(C.load(artifact), [{"x": x}])[0][0]
    want = run_ort(qdq, {"x": x})[0]
    # fixed-point requantisation (TFLite's) against ORT's float one: outputs within a few steps of
    # the softmax input's scale, the same top-1 on nearly every sample
    assert np.max(np.abs(got - want)) < 0.05
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95


def test_compile_flow_builds_and_verifies_the_c_candidate(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    x = np.random.default_rng(5).standard_normal((8, 1, 8, 8)).astype(np.float32)
    report = dlopt.compile(model, target="cortex-m7", out=tmp_path / "out", precision="fp32", inputs={"x": x})
    chosen = report.chosen_candidate()
    assert chosen is not None and chosen.backend == "c" and chosen.precision == "fp32"
    assert chosen.fidelity.max_rel_error <= 1e-4 and chosen.fidelity.top1_agreement == 1.0
    assert (tmp_path / "out" / "model.c").is_file() and (tmp_path / "out" / "INTEGRATION.md").is_file()
    assert "build `model.c` and `dlopt_kernels.c` into the firmware" in (tmp_path / "out" / "README.md").read_text()


def test_inspect_lists_the_c_backends_op_coverage(tmp_path):
    from cli import dlopt as run_cli

    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    done = run_cli("inspect", model, "--target", "cortex-m7")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("c "))
    assert "fp32, int8" in row and row.split()[-1] == "none"


@needs_cross
def test_the_shipped_makefile_builds_the_library(built, tmp_path):
    import shutil
    import subprocess

    folder = shutil.copytree(built("cortex-m4").folder, tmp_path / "shipped")  # make writes into its own copy
    text = (folder / "Makefile").read_text()
    assert "-mcpu=cortex-m4" in text and "-Werror" in text and "-ffp-contract=off" in text
    done = subprocess.run(["make", "-C", str(folder), "libdlopt_model.a"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (folder / "libdlopt_model.a").stat().st_size > 1000


def op_zoo() -> onnx.ModelProto:
    """Depthwise/strided/SAME convs, AveragePool, Clip, Sigmoid, Tanh, broadcast Mul/Sub/Div, MatMul."""
    rng = np.random.default_rng(7)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [init("wd", rng.standard_normal((3, 1, 3, 3)) * 0.5), init("ws", rng.standard_normal((6, 3, 3, 3)) * 0.3),
             init("scale", rng.uniform(0.5, 1.5, (6, 1, 1))), init("shift", rng.standard_normal((1, 6, 1, 1)) * 0.1),
             init("lo", -0.5), init("hi", 0.8), init("two", 2.0), init("mm", rng.standard_normal((6, 5)) * 0.4)]
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], group=3, pads=[1, 1, 1, 1], name="depthwise"),
             helper.make_node("Conv", ["d", "ws"], ["s"], strides=[2, 2], auto_pad="SAME_UPPER", name="strided"),
             helper.make_node("Mul", ["s", "scale"], ["m"], name="mul"),
             helper.make_node("Sub", ["m", "shift"], ["sb"], name="sub"),
             helper.make_node("Clip", ["sb", "lo", "hi"], ["cl"], name="clip"),
             helper.make_node("AveragePool", ["cl"], ["ap"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                              name="avg"),
             helper.make_node("Sigmoid", ["ap"], ["sg"], name="sigmoid"),
             helper.make_node("Div", ["sg", "two"], ["dv"], name="div"),
             helper.make_node("Tanh", ["dv"], ["th"], name="tanh"),
             helper.make_node("GlobalAveragePool", ["th"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "mm"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_more_ops_match_onnx_runtime(tmp_path):
    proto = op_zoo()
    artifact = C.compile(ir.serde.deserialize_model(proto), resolve_target("cortex-m7"), tmp_path, precision="fp32",
                         threads=1)
    assert artifact.settings["memory"]["arena_bytes"] <= 1.05 * artifact.settings["memory"]["liveness_lower_bound_bytes"]
    session = C.load(artifact)
    try:
        for seed in range(3):
            x = np.random.default_rng(seed).standard_normal((1, 3, 9, 9)).astype(np.float32)
            got, want = session.run({"x": x})[0], run_ort(proto, {"x": x})[0]
            assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)), seed
    finally:
        session.close()


def test_cli_exit_codes_for_an_unsupported_op_and_a_ram_limit(tmp_path):
    from cli import dlopt as run_cli

    node = helper.make_node("Erf", ["x"], ["y"], name="erf")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    erf = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), erf)
    done = run_cli("compile", erf, "--target", "cortex-m7", "--precision", "fp32", "-o", tmp_path / "erf-out")
    assert done.returncode == 2, done.stderr
    assert "supports this model" in done.stderr and "Erf" in done.stderr
    assert not (tmp_path / "erf-out").exists()
    cnn = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), cnn)
    done = run_cli("compile", cnn, "--target", "cortex-m7", "--precision", "fp32", "--max-ram", "1024",
                   "-o", tmp_path / "cnn-out")
    assert done.returncode == 3, done.stderr
    assert "over --max-ram 1024; the liveness lower bound is 1280" in done.stderr
    assert not (tmp_path / "cnn-out").exists()


def test_the_report_carries_the_microcontroller_figures(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    report = dlopt.compile(model, target="cortex-m7", out=tmp_path / "out", precision="fp32", samples=4)
    mcu = report.chosen_candidate().mcu
    assert mcu.arena_bytes == mcu.liveness_lower_bound_bytes == 1280
    assert mcu.mcpu == "cortex-m7"
    if cross_tools() is True:
        figures = json.loads((tmp_path / "out" / "c_build.json").read_text())["figures"]
        assert (mcu.flash_bytes, mcu.ram_bytes) == (figures["flash_bytes"], figures["ram_bytes"])
        assert report.chosen_candidate().measurement.size_bytes == mcu.flash_bytes
        assert f"{mcu.flash_bytes} B flash" in report.summary and "not device latency" in report.summary
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["schema_version"] == "1.6" and saved["candidates"][-1]["mcu"]["arena_bytes"] == 1280
