"""README.md of an output folder, rendered from real compiles: the files it lists exist, its versions
and thread counts are the shipped settings, it claims no timing the report lacks, names cannot
break out of it, and its code runs on the real runtimes and gives what dlopt.load gives."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import models
from helpers import run_ort

import dlopt
from dlopt.core.profiles import resolve_target
from dlopt.report.readme import render_readme
from dlopt.targets.tvm.facts import TVM_FFI_VERSION
from dlopt.targets import backend_status, tensorrt

HOSTILE = "x|<script>alert(1)</script>```@all"
# An x86-64 device this machine is not (it lacks the CPU flag): every backend ships in bundle/, and
# every one of them can still be run here to check the README's code.
BOARD = """
[targets.x86-board]
base = "cpu"
description = "an x86-64 board this machine is not"
cpu_flags = ["dlopt_no_such_flag"]
cores = 3
"""


@dataclass(frozen=True)
class Output:
    folder: Path
    report: dict
    manifest: dict
    text: str


def _compile(tmp: Path, name: str, model: Path, **options) -> Output:
    dlopt.compile(model, out=tmp / name, runs=3, samples=4, **options)
    folder = tmp / name
    report = json.loads((folder / "report.json").read_text())
    manifest = json.loads((folder / "manifest.json").read_text())
    return Output(folder, report, manifest, render_readme(report, manifest, folder))


def _hostile_model() -> onnx.ModelProto:
    w = models._init("w", np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    x = helper.make_tensor_value_info(HOSTILE, onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])
    return models._model([helper.make_node("MatMul", [HOSTILE, "w"], ["y"])], [x], [y], [w])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("readme")
    models.save(models.conv_bn_relu(batch="N"), tmp / "m.onnx")
    models.save(_hostile_model(), tmp / "h.onnx")
    (tmp / "board.toml").write_text(BOARD)
    return tmp


@pytest.fixture(scope="module")
def rpi5(tmp) -> Output:
    return _compile(tmp, "rpi5", tmp / "m.onnx", target="rpi5")


@pytest.fixture(scope="module")
def board(tmp) -> Output:
    return _compile(tmp, "board", tmp / "m.onnx", target="x86-board", precision="fp32",
                    targets_file=tmp / "board.toml")


@pytest.fixture(scope="module")
def cpu(tmp) -> Output:
    return _compile(tmp, "cpu", tmp / "h.onnx", target="cpu", precision="fp32")


@pytest.fixture(scope="module")
def gpu(tmp) -> Output:
    return _compile(tmp, "gpu", tmp / "h.onnx", target="nvidia-gpu", precision="fp16")


def _rows(text: str) -> list[list[str]]:
    """Cells of the "What is inside" table, split on unescaped pipes."""
    lines = text.split("## What is inside", 1)[1].split("\n## ", 1)[0].splitlines()
    table = [line for line in lines if line.startswith("| ")][2:]  # past the header and its rule
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block; a fence closes only on a line of the same fence."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.fullmatch(r"(`{3,})(\w*)", lines[i])
        if opening:
            end = lines.index(opening.group(1), i + 1)
            blocks.append((opening.group(2), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def _python(text: str, module: str) -> str:
    found = [code for lang, code in _blocks(text)
             if lang == "python" and re.search(rf"^import {module}( as \w+)?$", code, re.MULTILINE)]
    assert len(found) == 1, f"one python block importing {module}: {len(found)}"
    return found[0]


_SAVE = """
import numpy as _np
def _arrays(v):
    if hasattr(v, "numpy"):
        return [v.numpy()]
    if isinstance(v, _np.ndarray):
        return [v]
    return [a for item in v for a in _arrays(item)]
_np.savez({path!r}, *_arrays(outs))
"""


def _run_snippet(code: str, folder: Path, result: Path) -> list[np.ndarray]:
    """Run a README snippet as a user would, from the output folder, and return its ``outs``."""
    run = subprocess.run([sys.executable, "-c", code + _SAVE.format(path=str(result))], cwd=folder,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(result) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _settings(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize("name", ["rpi5", "board", "gpu"])
def test_every_file_listed_exists_and_every_candidate_file_is_listed(request, name):
    out: Output = request.getfixturevalue(name)
    rows = _rows(out.text)
    assert len(rows) == 1 + len(out.manifest["bundle"])
    top = rows[0]
    assert top[0] == "top level" and top[1] == f"{out.manifest['backend']}/{out.manifest['precision']}"
    assert set(out.manifest["files"]) <= set(top[2].split(", "))
    for where, key, files, _size, _status in rows:
        folder = out.folder if where == "top level" else out.folder / where
        listed = files.split(", ")
        assert all((folder / f).is_file() for f in listed), (where, listed)
        if where != "top level":
            assert out.manifest["bundle"][key] == where
            assert sorted(listed) == sorted(p.name for p in folder.iterdir())  # nothing left out
    for name in ("verify.npz", "run_candidates.py"):  # the device files, where this dlopt writes them
        assert (name in out.text.split("## Install", 1)[0]) == (out.folder / name).is_file()


def test_versions_and_threads_are_the_shipped_settings(rpi5):
    options = _settings(rpi5.folder, "session_options.json")
    assert options["intra_op_num_threads"] == 4  # the Pi 5's cores, not this machine's
    assert f"`pip install onnxruntime=={options['onnxruntime_version']} numpy`" in rpi5.text
    ort_code = _python(rpi5.text, "onnxruntime")
    assert "options.intra_op_num_threads = 4\n" in ort_code
    assert "providers = [p for p in ['CPUExecutionProvider'] if p in ort.get_available_providers()]" in ort_code
    tvm_dir = rpi5.folder / "bundle" / "tvm-fp32"
    if not tvm_dir.is_dir():
        pytest.skip("TVM built no rpi5 library here (apache-tvm or aarch64-linux-gnu-gcc missing)")
    built = _settings(tvm_dir, "tvm_build.json")
    assert built["threads"] == 4
    assert (f"`pip install apache-tvm=={built['tvm_version']} apache-tvm-ffi=={TVM_FFI_VERSION} numpy`; "
            "`export TVM_USE_RUNTIME_LIB=1`") in rpi5.text
    tvm_code = _python(rpi5.text, "tvm")
    assert "os.environ.setdefault('TVM_NUM_THREADS', '4')" in tvm_code
    assert "tvm.runtime.load_module('bundle/tvm-fp32/model.so')" in tvm_code


def test_input_names_and_timed_shapes_are_in_the_code(rpi5):
    feed = "{'x': np.zeros((1, 3, 16, 16), 'float32')}"
    assert f"with dlopt.load('.') as r:\n    outs = r.run({feed})" in _python(rpi5.text, "dlopt")
    assert f"outs = session.run(None, {feed})" in _python(rpi5.text, "onnxruntime")


@pytest.mark.parametrize("name", ["rpi5", "gpu"])
def test_a_device_target_claims_no_timing(request, name):
    out: Output = request.getfixturevalue(name)
    target = out.report["target"]["name"]
    assert all((c["measurement"] or {}).get("latency") is None for c in out.report["candidates"])  # what it holds
    assert f"**Nothing here was timed on the {target} device yet**" in out.text
    assert not re.search(r"p50|measured here|\d\.\d+x the original|\bms\b", out.text)
    for row in _rows(out.text):
        assert row[4].endswith("not yet measured on the device; run `dlopt bench` there"), row


def test_a_host_target_states_the_reports_own_timing(cpu):
    chosen = next(c for c in cpu.report["candidates"] if c["artifact_dir"] == ".")
    p50, speedup = chosen["measurement"]["latency"]["p50_ms"], chosen["speedup"]
    (status,) = [row[4] for row in _rows(cpu.text)]
    assert f"measured here: p50 {p50:.3f} ms" in status
    assert (f"{speedup:.2f}x the original's speed" in status) == bool(speedup)
    assert "Nothing here was timed" not in cpu.text


def test_tensorrt_bundle_install_lines_come_from_its_build_file(gpu):
    profile = _settings(gpu.folder, "tensorrt_build.json")["optimization_profile"]
    (shapes,) = profile.values()
    assert (shapes["min"], shapes["opt"], shapes["max"]) == ([1, 4], [1, 4], [8, 4])
    assert "from 1x4 to 8x4 (tuned for 1x4)" in gpu.text
    assert "`pip install onnxruntime-gpu==" in gpu.text  # its ORT sessions ask for the TensorRT/CUDA providers
    # the top level is an engine-build bundle dlopt cannot run: the dlopt snippet loads an ORT candidate
    assert "with dlopt.load('bundle/ort-fp16') as r:" in _python(gpu.text, "dlopt")
    assert "skip TensorRT candidates" in gpu.text and "trtexec --loadEngine=model.engine" in gpu.text


def test_plain_runtime_code_runs_and_matches_dlopt_load(board, tmp_path):
    feed = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    original = run_ort(onnx.load(board.folder.parent / "m.onnx"), feed)[0]
    checked = []
    for backend, module, where in [("ort", "onnxruntime", "."), ("openvino", "openvino", "bundle/openvino-fp32"),
                                   ("tvm", "tvm", "bundle/tvm-fp32")]:
        row = next((c for c in board.report["candidates"] if c["backend"] == backend), None)
        if row is None or row["status"] != "ok":
            continue  # that runtime is not installed here: the compile said why in report.json
        assert row["artifact_dir"] == where
        got = _run_snippet(_python(board.text, module), board.folder, tmp_path / f"{backend}.npz")
        with dlopt.load(board.folder / where) as runner:
            expected = runner.run(feed)
        assert len(got) == len(expected) == 1
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[0], original, rtol=1e-4, atol=1e-5)
        checked.append(backend)
    assert checked == [b for b in ("ort", "openvino", "tvm") if backend_status(b) is True]
    threads = _settings(board.folder, "session_options.json")["intra_op_num_threads"]
    assert threads == 3 and f"options.intra_op_num_threads = {threads}\n" in _python(board.text, "onnxruntime")
    if "openvino" in checked:
        ov = _settings(board.folder / "bundle" / "openvino-fp32", "runtime_config.json")
        assert f"`pip install openvino=={ov['openvino_version'].split('-')[0]} numpy`" in board.text
        assert repr(ov["properties"]) in _python(board.text, "openvino")


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_a_hostile_input_name_is_text_in_prose_and_a_literal_in_code(request, name, tmp_path):
    out: Output = request.getfixturevalue(name)
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py renders the README as GitHub would")
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    html = md.render(out.text)
    assert "<script" not in html.lower() and "&lt;script&gt;" in html  # shown as text, not run
    tokens = md.parse(out.text)
    fences = [t for t in tokens if t.type == "fence"]
    assert [t.info for t in fences] == [lang for lang, _ in _blocks(out.text)]  # no fence closed early
    python = [t.content for t in fences if t.info == "python"]
    assert python and all(repr(HOSTILE) in code for code in python)
    cells = [sum(1 for t in tokens[i:] if t.type == "td_open") for i, t in enumerate(tokens) if t.type == "tbody_open"]
    assert cells == [5 * len(_rows(out.text))]  # a name split no row into extra cells
    if name == "gpu":
        assert "x\\|&lt;script>alert(1)&lt;/script>\\`\\`\\`@&#8203;all from 1x4 to 8x4" in out.text
    # the literal is the real input name: the dlopt snippet runs with it
    (got,) = _run_snippet(_python(out.text, "dlopt"), out.folder, tmp_path / "dlopt.npz")
    assert got.shape == (1, 3) and not got.any()  # zeros in, zeros out of the MatMul


def test_tensorrt_readme_txt_says_what_verifies_the_engine_and_what_does_not(tmp_path):
    model = ir.serde.deserialize_model(models.conv_bn_relu())
    artifact = tensorrt.BACKEND.compile(model, resolve_target("jetson-orin"), tmp_path, precision="int8", threads=1)
    text = (tmp_path / "README.txt").read_text()
    assert "README.txt" in artifact.files
    assert "verify.npz" in text and "two levels up for a bundle/ candidate" in text
    assert "do not run TensorRT engines yet" in text and "the engine itself is not" in text
