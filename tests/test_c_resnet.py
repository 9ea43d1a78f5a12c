"""A CIFAR-style ResNet as users export it from torch compiles for Cortex-M7/M4 and runs under qemu.

torch.onnx.export's default (dynamo) exporter writes ``adaptive_avg_pool2d(x, 1)`` as ReduceMean
with its axes as an input (opset 18+), and folds BatchNorm into the convolutions; the C backend
generates it (fp32, and int8 with the mean as a float island between DequantizeLinear and
QuantizeLinear and the residual adds on the int8 bytes), the compile verifies the C against ONNX
Runtime on the host and the Cortex-M image under qemu-system-arm against the host build.
ReduceMean's other forms (axes attribute before opset 18, keepdims 0, no axes,
noop_with_empty_axes) match ONNX Runtime; forms it cannot generate are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.core.errors import ModelError
from dlopt.core.profiles import resolve_target
from dlopt.targets import get_backend
from dlopt.targets.c.codegen import generate, prepare
from dlopt.targets.c.kernels import HEADER, SOURCE
from dlopt.targets.c.verify import HostSession, cross_tools, qemu_tools
from cli import dlopt as run_cli
from helpers import run_ort, run_session

C = get_backend("c")
# a Cortex-M7 board of the STM32F746 class (320 KB SRAM, 1 MB flash) and a Cortex-M4 of the
# STM32F411 class (128 KB SRAM, 512 KB flash): the builds must fit them
M7_RAM, M7_FLASH = 320 * 1024, 1024 * 1024
M4_RAM, M4_FLASH = 128 * 1024, 512 * 1024
TRAIN_STEPS = 60
EVAL_SAMPLES = 200
_BOARD = cross_tools() if cross_tools() is not True else qemu_tools()
needs_board = pytest.mark.skipif(_BOARD is not True, reason=f"needs arm-none-eabi-gcc and qemu-system-arm: {_BOARD}")
needs_gcc = pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="no host C compiler (gcc)")


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """ResNet-8 (stem, three basic blocks of 8/16/32 channels, stride-2 stages with 1x1 projection
    shortcuts, adaptive_avg_pool2d(x, 1), flatten, Linear 10) on 3x32x32, trained for a few steps on a
    toy task and exported with torch.onnx.export's defaults; eval.npz and calib.npz beside it hold
    held-out samples of the task (eval.npz with labels)."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            return F.relu(y + self.short(x))

    class ResNet8(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.stages = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 32, 2))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1)
            return self.fc(torch.flatten(x, 1))

    torch.manual_seed(0)
    module = ResNet8().train()
    # a few steps on a toy task (class c: noise plus template c) so the logits depend on the input and
    # BatchNorm has real statistics: on noise alone the untrained net gives one class for every input
    templates = torch.randn(10, 3, 32, 32)
    optimiser = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(TRAIN_STEPS):
        labels = torch.randint(0, 10, (32,))
        loss = F.cross_entropy(module(torch.randn(32, 3, 32, 32) + templates[labels]), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    folder = tmp_path_factory.mktemp("resnet")
    torch.onnx.export(module.eval(), (torch.randn(1, 3, 32, 32),), str(folder / "resnet.onnx"), input_names=["x"],
                      output_names=["logits"])
    for name, count in (("eval", EVAL_SAMPLES), ("calib", 64)):  # held-out samples of the toy task
        labels = torch.randint(0, 10, (count,))
        np.savez(folder / f"{name}.npz", x=(torch.randn(count, 3, 32, 32) + templates[labels]).numpy(),
                 labels=labels.numpy())
    return folder / "resnet.onnx"


def test_torch_exports_the_head_as_reduce_mean(resnet):
    proto = onnx.load(resnet)
    ops = {n.op_type for n in proto.graph.node}
    assert "ReduceMean" in ops and "GlobalAveragePool" not in ops
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    mean = next(n for n in proto.graph.node if n.op_type == "ReduceMean")
    assert len(mean.input) == 2  # opset 18+: axes are an input, not an attribute
    x = np.random.default_rng(0).standard_normal((64, 1, 3, 32, 32)).astype(np.float32)
    classes = {int(run_ort(proto, {"x": sample})[0].argmax()) for sample in x}
    assert len(classes) >= 4  # not one answer for every input: top-1 agreement below means something


def _candidates(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {(c["backend"], c["precision"]): c for c in report["candidates"]}


@needs_board
def test_resnet_compiles_for_cortex_m7_and_runs_under_qemu(resnet, tmp_path):
    out = tmp_path / "m7"
    done = run_cli("compile", resnet, "--target", "cortex-m7", "--calib", resnet.with_name("calib.npz"),
                   "--eval", resnet.with_name("eval.npz"), "--max-ram", M7_RAM, "--max-flash", M7_FLASH, "-o", out)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"]["labelled"] and report["evaluation"]["samples"] == EVAL_SAMPLES
    assert report["baseline"]["accuracy"] >= 0.95  # the toy task is learnt: top-1 is not chance
    found = _candidates(out)
    fp32, int8 = found[("c", "fp32")], found[("c", "int8")]
    assert fp32["status"] == int8["status"] == "ok" and ("c", "mixed") not in found  # int8 within the budget
    assert fp32["measurement"]["accuracy"] == report["baseline"]["accuracy"]
    assert fp32["fidelity"]["top1_agreement"] == 1.0 and fp32["fidelity"]["max_rel_error"] <= 1e-5
    assert int8["measurement"]["accuracy"] >= report["baseline"]["accuracy"] - 0.01
    assert int8["fidelity"]["top1_agreement"] >= 0.98 and int8["fidelity"]["min_cosine"] >= 0.99
    for c in (fp32, int8):
        mcu = c["mcu"]
        assert mcu["qemu"]["board"] == "mps2-an500" and mcu["qemu"]["max_abs_diff"] <= 1e-5
        assert mcu["ram_bytes"] <= M7_RAM and mcu["flash_bytes"] <= M7_FLASH
        assert mcu["arena_bytes"] == mcu["liveness_lower_bound_bytes"]
    # fp32: two 8x32x32 float maps (32 KB each) and a third at the first residual add; weights ~80 KB
    assert fp32["mcu"]["arena_bytes"] <= 3 * 32768 and 70_000 < fp32["mcu"]["flash_bytes"] < 100_000
    assert int8["mcu"]["flash_bytes"] < 0.4 * fp32["mcu"]["flash_bytes"]
    settings = json.loads((out / "c_build.json").read_text())
    assert settings["precision"] == "int8"  # chosen by precision preference: it ships at the top level
    # the residual adds run on the int8 bytes: int8 maps (8 KB each) only, about a quarter of fp32's arena
    assert settings["ops"]["Add[int8]"] == 3 and settings["ops"]["ReduceMean"] == 1
    assert int8["mcu"]["arena_bytes"] <= 3 * 8192
    # built with ONNX Runtime's requantisation the int8 C is bit-identical to ORT on the QDQ graph it ships
    x = np.random.default_rng(4).standard_normal((4, 1, 3, 32, 32)).astype(np.float32)
    session = HostSession(out, settings["inputs"], settings["outputs"], defines=("DLOPT_REQUANT_FLOAT",))
    try:
        got = [session.run({"x": sample})[0] for sample in x]
    finally:
        session.close()
    reference = onnx.load(out / "reference.onnx")
    assert all(np.array_equal(g, run_ort(reference, {"x": sample})[0]) for g, sample in zip(got, x))


@needs_board
def test_resnet_fp32_builds_for_cortex_m4(resnet, tmp_path):
    """The backend alone (the exported graph has BatchNorm folded already): host gcc, arm-none-eabi-gcc
    for the M4 and the image under qemu -M mps2-an386."""
    model = ir.serde.deserialize_model(onnx.load(resnet))  # the exporter wrote resnet.onnx.data: read it in
    artifact = C.compile(model, resolve_target("cortex-m4"), tmp_path / "m4", precision="fp32", threads=1,
                         max_ram=M4_RAM, max_flash=M4_FLASH)
    settings = artifact.settings
    assert settings["mcpu"] == "cortex-m4" and settings["qemu"]["board"] == "mps2-an386"
    assert settings["qemu"]["max_abs_diff"] <= 1e-5
    assert settings["figures"]["ram_bytes"] <= M4_RAM and settings["figures"]["flash_bytes"] <= M4_FLASH
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    got = run_session(C.load(artifact), [{"x": x}])[0][0]
    want = run_ort(onnx.load(resnet), {"x": x})[0]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def _reduce_model(opset: int) -> onnx.ModelProto:
    """One input, several ReduceMean forms, one output each."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])
    outs, nodes, inits = [], [], []

    def mean(name, shape, axes=None, **attrs):
        inputs = ["x"]
        if axes is not None and opset >= 18:
            inits.append(numpy_helper.from_array(np.array(axes, np.int64), f"{name}_axes"))
            inputs.append(f"{name}_axes")
        elif axes is not None:
            attrs["axes"] = axes
        nodes.append(helper.make_node("ReduceMean", inputs, [name], name=name, **attrs))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    mean("spatial", [1, 4, 1, 1], [2, 3])
    mean("spatial_flat", [1, 4], [-2, -1], keepdims=0)
    mean("channels", [1, 1, 5, 6], [1])  # inner > 1
    mean("chw", [1], [1, 2, 3], keepdims=0)
    mean("everything", [1, 1, 1, 1])
    if opset >= 18:
        mean("noop", [1, 4, 5, 6], noop_with_empty_axes=1)
    graph = helper.make_graph(nodes, "means", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _host_run(proto, tmp_path, feeds: list[dict]):
    """The generated C built with the host gcc (no Cortex-M build, no qemu): its outputs on each feed."""
    gen = generate(prepare(proto))
    tmp_path.mkdir(parents=True, exist_ok=True)
    for file, text in {"model.c": gen.model_c, "model.h": gen.model_h, "dlopt_kernels.c": SOURCE,
                       "dlopt_kernels.h": HEADER}.items():
        (tmp_path / file).write_text(text)
    session = HostSession(tmp_path, gen.inputs, gen.outputs)
    try:
        return gen, [session.run(f) for f in feeds]
    finally:
        session.close()


@needs_gcc
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_mean_forms_match_onnx_runtime(tmp_path, opset):
    proto = _reduce_model(opset)
    x = np.random.default_rng(opset).standard_normal((1, 4, 5, 6)).astype(np.float32)
    gen, [got] = _host_run(proto, tmp_path / f"opset{opset}", [{"x": x}])
    want = run_ort(proto, {"x": x})
    assert len(got) == len(want) == (6 if opset >= 18 else 5)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.max(np.abs(g - w)) <= 1e-6
    assert gen.ops["ReduceMean"] == len(want)


def test_reduce_mean_forms_it_cannot_generate_are_refused_in_one_line():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 5, 1])
    apart = helper.make_node("ReduceMean", ["x"], ["y"], name="apart", axes=[1, 3])
    model = helper.make_model(helper.make_graph([apart], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with pytest.raises(ModelError) as err:  # the generator, at compile time
        generate(prepare(model))
    assert str(err.value) == ("ReduceMean 'apart': the C backend averages over adjacent axes only; axes [1, 3] "
                              "of shape (1, 4, 5, 6) keep axis 2 between them")
    assert C.supports(ir.serde.deserialize_model(model)) == ["ReduceMean over non-adjacent axes [1, 3]"]
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [2])
    computed = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="computed")
    model = helper.make_model(helper.make_graph([computed], "g", [x, axes], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    assert C.supports(ir.serde.deserialize_model(model)) == ["ReduceMean with computed axes"]


@needs_gcc
def test_int8_add_sub_mul_with_relu_match_onnx_runtime_on_the_int8_bytes(tmp_path):
    """DQ(a), DQ(b) -> Add / Sub -> Relu / Mul -> QuantizeLinear each become one int8 kernel (no float
    copies of a or b), with ONNX Runtime's results."""
    def q(name, scale, zero, dtype):
        return [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                numpy_helper.from_array(np.array(zero, dtype), f"{name}_z")]

    inits = [*q("a", 0.02, 128, np.uint8), *q("b", 0.03, -5, np.int8), *q("add", 0.04, 120, np.uint8),
             *q("sub", 0.025, 60, np.uint8), *q("mul", 0.01, 3, np.int8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["qa"]),
             helper.make_node("QuantizeLinear", ["y", "b_s", "b_z"], ["qb"]),
             helper.make_node("DequantizeLinear", ["qa", "a_s", "a_z"], ["da"]),
             helper.make_node("DequantizeLinear", ["qb", "b_s", "b_z"], ["db"])]
    for op, relu in (("Add", False), ("Sub", True), ("Mul", False)):
        name = op.lower()
        nodes.append(helper.make_node(op, ["da", "db"], [f"{name}_f"], name=name))
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}_f"], [f"{name}_r"]))
        nodes += [helper.make_node("QuantizeLinear", [f"{name}_r" if relu else f"{name}_f", f"{name}_s",
                                                      f"{name}_z"], [f"{name}_q"]),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name])]
    shape = [1, 2, 3, 4]
    graph = helper.make_graph(nodes, "qbinary", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                                                 for n in ("x", "y")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                               for n in ("add", "sub", "mul")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = [{n: (np.random.default_rng(seed + k).standard_normal(shape) * 2).astype(np.float32)
              for k, n in enumerate(("x", "y"))} for seed in range(0, 8, 2)]
    gen, got = _host_run(model, tmp_path, feeds)
    assert gen.ops == {"QuantizeLinear": 2, "Add[int8]": 1, "Sub[int8]": 1, "Mul[int8]": 1, "DequantizeLinear": 3}
    assert gen.model_c.count("dl_dequantize_s8(") == 3  # the outputs only: a and b are never dequantised
    for outputs, f in zip(got, feeds):
        for g, w in zip(outputs, run_ort(model, f)):
            np.testing.assert_array_equal(g, w)
    assert min(float(o[1].min()) for o in got) == 0.0  # the Relu clamped some of Sub's outputs at its zero point
