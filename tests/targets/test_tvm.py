"""The TVM backend on real TVM and ONNX Runtime: numbers, ELF headers and embedded fatbins."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import threading

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

pytest.importorskip("tvm")

import models  # noqa: E402
from cli import dlopt  # noqa: E402
from helpers import max_rel_error, random_feed, run_ort  # noqa: E402

from dlopt.core.errors import CompileError, DataError, TargetUnavailable  # noqa: E402
from dlopt.core.profiles import resolve_target  # noqa: E402
from dlopt.targets import Artifact  # noqa: E402
from dlopt.targets.tvm import backend  # noqa: E402

EM_AARCH64, ET_DYN = 183, 3
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
CROSS = "aarch64-linux-gnu-gcc"
needs_cross = pytest.mark.skipif(shutil.which(CROSS) is None,
                                 reason=f"{CROSS} not installed (apt-get install gcc-aarch64-linux-gnu)")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")


def build(proto, target: str, folder, threads: int = 2) -> Artifact:
    profile = resolve_target(target) if isinstance(target, str) else target
    return backend.BACKEND.compile(ir.serde.deserialize_model(proto), profile, folder, precision="fp32", threads=threads)


def fatbin_entries(data: bytes) -> list[tuple[int, int]]:
    """(kind, sm) of every entry of every fatbin in ``data``; kind 1 is PTX, 2 is a cubin (ELF)."""
    entries, at = [], data.find(FATBIN_MAGIC)
    while at >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, at)
        entry = at + header
        while entry < at + header + size:
            kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, entry)
            entries.append((kind, struct.unpack_from("<I", data, entry + 28)[0]))
            entry += entry_header + padded
        at = data.find(FATBIN_MAGIC, at + header + size)
    return entries


def test_available_and_precisions():
    import tvm

    from dlopt.targets import get_backend

    assert backend.BACKEND.available() is True
    assert get_backend("tvm") is backend.BACKEND and backend.BACKEND.entry == "model.so"
    assert backend.BACKEND.runtime_version().startswith(f"tvm {tvm.__version__}, apache-tvm-ffi ")
    assert backend.BACKEND.precisions(resolve_target("cpu")) == ("fp32",)
    assert backend.BACKEND.precisions(resolve_target("jetson-orin")) == ("fp32",)
    assert backend.BACKEND.precisions(resolve_target("cortex-m7")) == ()


def test_host_library_matches_onnxruntime(tmp_path):
    proto = models.conv_bn_relu(channels=8, size=16)
    artifact = build(proto, "cpu", tmp_path)
    assert artifact.loadable_here and artifact.files == ["model.so", "tvm_build.json"]
    record = json.loads((tmp_path / "tvm_build.json").read_text())
    assert record["form"] == "x86_64 shared library" or record["host"]["mtriple"].startswith("aarch64")
    assert record["tuning"].startswith("untuned")
    session = backend.BACKEND.load(artifact)
    assert session.input_names == ["x"]
    for seed in range(5):
        feed = random_feed(proto, seed)
        (ref,), (got,) = run_ort(proto, feed), session.run(feed)
        assert got.shape == ref.shape == (1, 10)
        assert max_rel_error(ref, got) <= 1e-4


def test_weights_live_in_the_library(tmp_path):
    proto = models.conv_bn_relu(channels=8, size=16, seed=3)
    artifact = build(proto, "cpu", tmp_path / "build")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(artifact.entry_path, alone / "model.so")  # no params file, no ONNX next to it
    session = backend.BACKEND.load(Artifact("tvm", "fp32", alone, ["model.so"], "model.so", settings=artifact.settings))
    feed = random_feed(proto, 7)
    assert max_rel_error(run_ort(proto, feed)[0], session.run(feed)[0]) <= 1e-4


def test_functions_symbolic_batch_and_several_outputs(tmp_path):
    double = helper.make_function("local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 18)])
    graph = helper.make_graph(
        [helper.make_node("Double", ["x"], ["y"], domain="local"), helper.make_node("Relu", ["y"], ["z"]),
         helper.make_node("Split", ["z"], ["left", "right"], axis=1, num_outputs=2)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in ("left", "right")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                              functions=[double])
    proto.ir_version = 8
    session = backend.BACKEND.load(build(proto, "cpu", tmp_path))
    feed = {"x": np.array([[-2.0, -1.0, 0.5, 3.0]], np.float32)}  # symbolic N compiled as 1
    outputs = session.run(feed)
    assert len(outputs) == 2
    for ref, got in zip(run_ort(proto, feed), outputs, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    two = {"x": np.array([[-2.0, -1.0, 0.5, 3.0], [1.0, -3.0, 2.0, 0.0]], np.float32)}
    for ref, got in zip(run_ort(proto, two), session.run(two), strict=True):  # a batch of 2, sample by sample
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    with pytest.raises(DataError, match=r"built for \[1, 4\]"):
        session.run({"x": np.zeros((1, 5), np.float32)})


def _in_new_thread(work):
    """``work()`` in a fresh thread, whose TVM thread pool does not exist yet."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(work()))
    thread.start()
    thread.join()
    return result


def test_thread_count_reaches_the_runtime(tmp_path):
    artifact = build(models.conv_bn_relu(), "cpu", tmp_path, threads=1)
    environ, affinity = dict(os.environ), os.sched_getaffinity(0)
    got = _in_new_thread(lambda: {"threads": backend.BACKEND.load(artifact).threads, "affinity": os.sched_getaffinity(0)})
    assert got == {"threads": 1, "affinity": affinity}  # TVM pinned a 1-thread pool's caller to one core
    assert dict(os.environ) == environ  # no TVM_NUM_THREADS left behind


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_session_sets_up_the_pool_of_each_thread_that_runs_it(tmp_path):
    import tvm

    proto = models.conv_bn_relu()
    environ, affinity = dict(os.environ), os.sched_getaffinity(0)
    session = backend.BACKEND.load(build(proto, "cpu", tmp_path, threads=2))
    feed = random_feed(proto, 1)
    got = _in_new_thread(lambda: {"out": session.run(feed)[0], "affinity": os.sched_getaffinity(0),
                                  "threads": int(tvm.get_global_func("runtime.NumThreads")())})
    assert got["threads"] == 2 and got["affinity"] == affinity == os.sched_getaffinity(0)
    assert max_rel_error(run_ort(proto, feed)[0], got["out"]) <= 1e-4
    assert dict(os.environ) == environ


def maxpool_with_indices():
    """Valid ONNX that ONNX Runtime runs and TVM's frontend fails on (MaxPool's indices output)."""
    nodes = [helper.make_node("MaxPool", ["x"], ["pool", "idx"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Cast", ["idx"], ["idxf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["pool", "idxf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def test_tvm_native_warnings_stay_off_the_terminal(tmp_path):
    models.save(maxpool_with_indices(), tmp_path / "m.onnx")
    (tmp_path / "dlopt.toml").write_text('[targets.tvm-cpu]\nbase = "cpu"\nbackends = ["ort", "tvm"]\n')
    args = ["compile", "m.onnx", "--target", "tvm-cpu", "--precision", "fp32", "--runs", "5"]
    quiet = dlopt(*args, "-o", "quiet", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    report = json.loads((tmp_path / "quiet" / "report.json").read_text())
    (tvm,) = [c for c in report["candidates"] if c["backend"] == "tvm"]
    assert tvm["status"] == "failed" and "Missing outputs during conversion" in tvm["reason"]
    # TVM's C++ logger writes to fd 2 as the half-built BlockBuilder is destroyed
    assert "BlockBuilder" not in quiet.stderr and "Warning" not in quiet.stderr, quiet.stderr
    debug = dlopt("-vv", *args, "-o", "debug", cwd=tmp_path)  # kept, at debug level
    assert debug.returncode == 0, debug.stderr
    assert re.search(r"DEBUG dlopt\.targets\.tvm\.backend: TVM wrote while building for tvm-cpu:\n.*"
                     r"BlockBuilder destroyed with remaining blocks!", debug.stderr), debug.stderr[-3000:]


def test_a_failed_build_leaves_fd_2_and_the_environment_as_they_were(tmp_path):
    environ, before = dict(os.environ), os.fstat(2)
    with pytest.raises(CompileError, match=r"TVM could not build cpu: Missing outputs during conversion"):
        build(maxpool_with_indices(), "cpu", tmp_path)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert dict(os.environ) == environ


def test_supports_names_ops_without_a_converter():
    assert backend.BACKEND.supports(ir.serde.deserialize_model(models.conv_bn_relu())) == []
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Relu", ["r"], ["c"], domain="com.example"),
         helper.make_node("Det", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    # the frontend ignores domains: a custom Relu must not pass for ONNX's
    assert backend.BACKEND.supports(ir.serde.deserialize_model(proto)) == ["Det", "com.example.Relu"]


def test_missing_cross_compiler_says_which_package(tmp_path):
    profile = dataclasses.replace(resolve_target("rpi5"), arch="riscv64", triple="riscv64-linux-gnu",
                                  cross_compiler="riscv64-linux-gnu-gcc-0")
    if shutil.which(profile.cross_compiler):
        pytest.skip("a compiler of that name exists here")
    with pytest.raises(TargetUnavailable, match=r"apt-get install gcc-riscv64-linux-gnu"):
        build(models.conv_bn_relu(), profile, tmp_path)


@needs_cross
def test_rpi5_library_is_aarch64_with_neon(tmp_path):
    artifact = build(models.conv_bn_relu(), "rpi5", tmp_path)
    assert not artifact.loadable_here
    assert artifact.settings["form"] == "aarch64 shared library (NEON)"
    assert artifact.settings["host"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                                         "mattr": ["+neon"], "num-cores": 4}
    data = artifact.entry_path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (ET_DYN, EM_AARCH64)
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        code = subprocess.run([objdump, "-d", str(artifact.entry_path)], capture_output=True, text=True).stdout
        assert len(re.findall(r"\bfmla\s+v\d+\.4s", code)) > 10  # 4-lane float multiply-adds


@needs_cross
@needs_nvcc
def test_jetson_orin_library_embeds_an_sm87_fatbin(tmp_path):
    artifact = build(models.conv_bn_relu(), "jetson-orin", tmp_path)
    record = json.loads((tmp_path / "tvm_build.json").read_text())
    assert record["form"] == "aarch64 host + CUDA fatbin sm_87"
    assert record["target"]["kind"] == "cuda" and record["target"]["arch"] == "sm_87"
    assert not artifact.loadable_here
    data = artifact.entry_path.read_bytes()
    assert struct.unpack_from("<H", data, 18)[0] == EM_AARCH64
    assert set(fatbin_entries(data)) == {(2, 87), (1, 87)}  # sm_87 cubin + compute_87 PTX
    assert b"__global__" not in data  # kernels compiled, not shipped as source


def test_without_nvcc_the_kernels_ship_as_source(tmp_path, monkeypatch):
    nvcc = shutil.which("nvcc")
    path = [d for d in os.environ["PATH"].split(os.pathsep)
            if not (nvcc and os.path.samefile(d, os.path.dirname(nvcc))) and os.path.isdir(d)]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    if shutil.which("nvcc") or not shutil.which("gcc"):
        pytest.skip("cannot hide nvcc from PATH while keeping gcc")
    artifact = build(models.conv_bn_relu(), "nvidia-gpu", tmp_path)
    assert artifact.settings["form"] == "x86_64 host + CUDA source (compiled on device at load)"
    assert artifact.settings["fatbin_error"] == "nvcc not found"
    data = artifact.entry_path.read_bytes()
    assert b"__global__" in data and not fatbin_entries(data)


def test_dlopt_compile_verifies_the_tvm_candidate(tmp_path, monkeypatch):
    import dlopt
    from dlopt import targets

    monkeypatch.setitem(targets.BACKEND_MODULES, "tvm", "dlopt.targets.tvm.backend")
    report = dlopt.compile(models.conv_bn_relu(), target="cpu", out=tmp_path / "o", precision="fp32", runs=5)
    (tvm,) = [c for c in report.candidates if c.backend == "tvm" and c.precision == "fp32"]
    assert tvm.status == "ok", tvm.reason
    assert tvm.fidelity.max_rel_error <= 1e-4
    assert tvm.artifact_files == ["model.so", "tvm_build.json"]


def test_dynamic_batch_is_served_sample_by_sample(tmp_path):
    proto = models.conv_bn_relu(batch="N")
    artifact = backend.BACKEND.compile(ir.serde.deserialize_model(proto), resolve_target("cpu"), tmp_path,
                               precision="fp32", threads=1)
    session = backend.BACKEND.load(artifact)
    x = np.random.default_rng(4).standard_normal((5, 3, 16, 16)).astype(np.float32)
    (got,) = session.run({"x": x})
    assert got.shape == (5, 10)
    assert max_rel_error(run_ort(proto, {"x": x})[0], got) <= 1e-4


def test_symbolic_sequence_dim_takes_the_declared_shape(tmp_path):
    # [batch, seq, 8]: TVM needs static shapes; seq comes from the declared timing shape, not 1
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    artifact = backend.BACKEND.compile(ir.serde.deserialize_model(proto), resolve_target("cpu"), tmp_path, precision="fp32",
                               threads=1, shapes={"x": (4, 5, 8)})
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)  # batch 3 served sample by sample
    got = backend.BACKEND.load(artifact).run({"x": x})[0]
    assert got.shape == (3, 5, 4) and np.abs(got - x @ w).max() < 1e-4
