"""verify.npz, run_candidates.py, `dlopt verify`, `dlopt bench [--select]` and device_report.json.

Real ONNX Runtime, OpenVINO and TVM artefacts; the rpi5 TVM library under qemu-aarch64
where the emulation environment is installed (`make arm64-env`), skipped otherwise.  The dlopt verbs run in
this process (tests/serving.py ``dlopt_in``: the console script's command and exit mapping without its
start-up); run_candidates.py, whose own process must do without dlopt, runs as a script.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import models
from serving import dlopt_in as here

import dlopt as api
from dlopt.device.device_check import VerifyData
from dlopt.device.emulation import aarch64_python

AWAY = ('[targets.away]\nbase = "cpu"\nbackends = ["ort", "openvino", "tvm"]\n'
        'cpu_flags = ["dlopt-test-not-this-cpu"]\n')
MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")


@pytest.fixture(scope="module")
def rpi5(tmp_path_factory):
    """An rpi5 output of a dynamic-batch conv model: ORT fp32/fp16/int8 and the aarch64 TVM library."""
    tmp = tmp_path_factory.mktemp("rpi5")
    model = models.save(MODEL, tmp / "m.onnx")
    # 20 random samples, one a feed (a classifier's default would be 1000, 32 to a feed)
    done = here("compile", model, "--target", "rpi5", "-o", tmp / "out", "-q", "--runs", "20", "--samples", "20")
    assert done.returncode == 0, done.stderr
    return tmp / "out"


def test_rpi5_output_carries_the_boards_threads_and_verify_data(rpi5):
    settings = json.loads((rpi5 / "session_options.json").read_text())
    assert settings["intra_op_num_threads"] == 4 and "rpi5" in settings["threads_from"]
    assert json.loads((rpi5 / "bundle" / "tvm-fp32" / "tvm_build.json").read_text())["threads"] == 4
    data = VerifyData(rpi5 / "verify.npz")
    manifest = json.loads((rpi5 / "manifest.json").read_text())
    assert set(data.candidates) == {f"{manifest['backend']}/{manifest['precision']}", *manifest["bundle"]}
    assert data.meta["budget"]["max_drop_pp"] == 1.0 and data.meta["target"] == "rpi5"
    samples = sum(len(f["x"]) for f in data.feeds)
    assert samples == 16 and len(data.feeds) == 16  # random feeds of one sample each
    # the reference is the original model's output on those feeds
    import onnxruntime as ort

    session = ort.InferenceSession(MODEL.SerializeToString(), providers=["CPUExecutionProvider"])
    for feed, ref in zip(data.feeds, data.reference):
        np.testing.assert_allclose(session.run(None, feed)[0], ref[0], rtol=1e-5, atol=1e-6)
    tvm = data.candidates["tvm/fp32"]
    assert tvm["dir"] == "bundle/tvm-fp32" and tvm["allowed_rel_error"] == 1e-3  # not verified at build: the floor
    int8 = data.candidates["ort/int8"]
    assert int8["allowed_rel_error"] == max(2 * int8["rel_error_at_build"], 5e-2)
    report = json.loads((rpi5 / "report.json").read_text())
    assert all("run `dlopt" in c["reason"] for c in report["candidates"] if c["artifact_dir"])


def test_run_candidates_script_needs_no_dlopt(rpi5, tmp_path):
    """The bundle's script runs with numpy and onnxruntime only: dlopt is made unimportable."""
    blocker = tmp_path / "block"
    (blocker / "dlopt").mkdir(parents=True)
    (blocker / "dlopt" / "__init__.py").write_text("raise ImportError('dlopt is not on this device')\n")
    report_file = tmp_path / "device_report.json"
    done = subprocess.run([sys.executable, str(rpi5 / "run_candidates.py"), "--runs", "20", "--report",
                           str(report_file), "--candidate", "ort/fp32", "--candidate", "ort/int8"],
                          env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_file.read_text())
    rows = {r["key"]: r for r in report["candidates"]}
    assert set(rows) == {"ort/fp32", "ort/int8"} and report["tool"] == "run_candidates.py"
    assert rows["ort/fp32"]["verified"] is True and rows["ort/fp32"]["rel_error"] < 1e-5
    assert rows["ort/int8"]["verified"] is True and 0 < rows["ort/int8"]["rel_error"] <= 5e-2
    assert rows["ort/fp32"]["latency"]["runs"] >= 20 and rows["ort/fp32"]["ran_as"] == "native"


def test_a_broken_candidate_fails_verification(rpi5, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(rpi5, out)
    path = out / "bundle" / "ort-fp16" / "model.onnx"
    broken = onnx.load(str(path))
    weight = next(t for t in broken.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0] *= 3  # one output channel three times too strong: what a bad kernel on a device looks like
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(broken, str(path))
    # the broken candidate and a sound one (every candidate, the emulated TVM library too, in the emulation test)
    done = here("verify", out, "--json", "-q", "--candidate", "ort/fp16", "--candidate", "ort/fp32")
    assert done.returncode == 1
    rows = {r["key"]: r for r in json.loads(done.stdout)["candidates"]}
    assert set(rows) == {"ort/fp16", "ort/fp32"}
    assert rows["ort/fp16"]["verified"] is False and rows["ort/fp16"]["rel_error"] > 0.1
    assert "over the" in rows["ort/fp16"]["reason"]
    assert rows["ort/fp32"]["verified"] is True
    assert json.loads((out / "device_report.json").read_text())["tool"].startswith("dlopt verify")


def test_bench_writes_the_device_report_and_a_recompile_replaces_it(rpi5, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(rpi5, out)
    done = here("bench", out, "--runs", "20", "--json", "-q", "--candidate", "ort/fp32", "--candidate", "ort/int8")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "device_report.json").read_text())
    assert report["host"]["machine"] and report["this_machine_matches_target_arch"] is False
    assert all(r["latency"]["runs"] >= 20 and r["latency"]["p50_ms"] > 0 for r in report["candidates"])
    assert "## Measured on the device" in (out / "report.md").read_text()
    assert 'id="device"' in (out / "report.html").read_text()
    # --select on another machine than the device is refused: x86 timings do not choose for a Pi
    refused = here("bench", out, "--runs", "20", "-q", "--select", "--candidate", "ort/fp32")
    assert refused.returncode == 2 and "not the rpi5 device" in refused.stderr
    model = models.save(MODEL, tmp_path / "m.onnx")
    # any recompile into the folder replaces it: the rpi5 profile with ONNX Runtime's fp32 alone
    (tmp_path / "t.toml").write_text('[targets.rpi5-ort]\nbase = "rpi5"\nbackends = ["ort"]\n')
    again = here("compile", model, "--target", "rpi5-ort", "--targets-file", tmp_path / "t.toml", "-o", out, "-q",
                 "--precision", "fp32", "--runs", "20")
    assert again.returncode == 0, again.stderr
    assert not (out / "device_report.json").exists()


def test_select_moves_the_fastest_verified_candidate_to_the_top(tmp_path):
    from dlopt.workflows.promote import select

    toml = tmp_path / "away.toml"
    toml.write_text(AWAY)
    out = tmp_path / "out"
    api.compile(MODEL, target="away", targets_file=toml, out=out, precision="fp32", runs=20, cache=False)
    before = json.loads((out / "manifest.json").read_text())
    assert before["backend"] == "ort" and set(before["bundle"]) == {"openvino/fp32", "tvm/fp32"}
    print(select(out, "openvino/fp32"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["backend"], manifest["precision"]) == ("openvino", "fp32")
    assert manifest["bundle"] == {"tvm/fp32": "bundle/tvm-fp32", "ort/fp32": "bundle/ort-fp32"}
    assert (out / "model.xml").is_file() and (out / "bundle" / "ort-fp32" / "session_options.json").is_file()
    assert not (out / "bundle" / "openvino-fp32").exists() and not (out / "session_options.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] == "openvino/fp32"
    assert "| top level | openvino/fp32 | model.bin, model.xml, runtime_config.json |" in (out / "README.md").read_text()
    assert {c["backend"]: c["artifact_dir"] for c in report["candidates"]} == {
        "ort": "bundle/ort-fp32", "openvino": ".", "tvm": "bundle/tvm-fp32"}
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    with api.load(out) as top, api.load(out / "bundle" / "ort-fp32") as ort_runner:
        assert top.key == "openvino/fp32"
        np.testing.assert_allclose(top.run({"x": x})[0], ort_runner.run({"x": x})[0], rtol=1e-4, atol=1e-5)
    done = here("verify", out, "--json", "-q")
    assert done.returncode == 0, done.stderr
    rows = {r["key"]: r for r in json.loads(done.stdout)["candidates"]}
    assert {k: r["verified"] for k, r in rows.items()} == {"ort/fp32": True, "openvino/fp32": True, "tvm/fp32": True}
    assert rows["openvino/fp32"]["dir"] == "."


def test_rpi5_tvm_library_is_verified_and_timed_under_emulation(rpi5, tmp_path):
    python = aarch64_python()
    if isinstance(python, str):
        pytest.skip(f"no aarch64 emulation here: {python}")
    import shutil

    out = tmp_path / "out"
    shutil.copytree(rpi5, out)
    done = here("bench", out, "--runs", "20", "--json", "-q")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = {r["key"]: r for r in report["candidates"]}
    assert rows["tvm/fp32"]["ran_as"] == "qemu-aarch64 emulation (cortex-a76)" and rows["tvm/fp32"]["verified"] is True
    assert rows["tvm/fp32"]["rel_error"] < 1e-4 and rows["tvm/fp32"]["latency"]["runs"] >= 20
    assert all(r["ran_as"] == "native" and r["verified"] for k, r in rows.items() if k.startswith("ort/"))
    assert report["fastest_verified"].startswith("ort/")  # emulated timings never compete
    assert "emulated, not a device figure" in (out / "report.md").read_text()


def test_jetson_bundle_verifies_its_ort_candidates_and_skips_what_needs_the_board(tmp_path):
    model = models.save(MODEL, tmp_path / "m.onnx")
    out = tmp_path / "jet"
    done = here("compile", model, "--target", "jetson-orin", "-o", out, "-q", "--runs", "20")
    assert done.returncode == 0, done.stderr
    assert "--minShapes=x:1x3x16x16 --optShapes=x:1x3x16x16 --maxShapes=x:8x3x16x16" in (
        out / "build_engine.sh").read_text()
    done = here("verify", out, "--json", "-q")
    assert done.returncode == 0, done.stderr
    rows = {r["key"]: r for r in json.loads(done.stdout)["candidates"]}
    assert all(r["verified"] for k, r in rows.items() if k.startswith("ort/"))
    # the CUDA library and the engine-build bundles need the board: skipped, never emulated or failed
    assert rows["tvm/fp32"]["verified"] is None and rows["tvm/fp32"]["ran_as"] is None
    assert all(r["verified"] is None for k, r in rows.items() if k.startswith("tensorrt/"))
