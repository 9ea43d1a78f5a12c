"""dlopt.load(out).run(feeds) and `dlopt run`: real ORT, OpenVINO and TVM artefacts, batch 1 and 8.

`dlopt run` runs in this process (tests/serving.py ``dlopt_in``: the console script's command, printing and
exit mapping without its start-up)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import models
from serving import dlopt_in as here
from helpers import max_rel_error, run_ort

import dlopt as api
from dlopt.core.errors import ConfigError, DataError, TargetUnavailable

# A target like this CPU that "is not this machine" (a CPU flag no host has): nothing is timed, so
# the backend order decides what ships at the top level and every other candidate ships in bundle/.
AWAY = ('[targets.{name}]\nbase = "cpu"\nbackends = [{backends}]\ncpu_flags = ["dlopt-test-not-this-cpu"]\n')
MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    """name -> output folder: ort first (openvino, tvm in bundle/), openvino first (tvm in bundle/), tvm alone."""
    tmp = tmp_path_factory.mktemp("load")
    found = {}
    for name, backends in (("ort", ("ort", "openvino", "tvm")), ("openvino", ("openvino", "tvm")), ("tvm", ("tvm",))):
        toml = tmp / f"{name}.toml"
        toml.write_text(AWAY.format(name=f"away-{name}", backends=", ".join(f'"{b}"' for b in backends)))
        out = tmp / f"out-{name}"
        report = api.compile(MODEL, target=f"away-{name}", targets_file=toml, out=out, precision="fp32", runs=20,
                             cache=False)
        assert report.chosen == f"{name}/fp32"
        found[name] = out
    return found


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 16, 16)).astype(np.float32)


ARTEFACTS = [("ort", "."), ("openvino", "."), ("tvm", "."),
             ("ort", "bundle/openvino-fp32"), ("ort", "bundle/tvm-fp32"), ("openvino", "bundle/tvm-fp32")]


@pytest.mark.parametrize(("out", "where"), ARTEFACTS)
def test_load_reproduces_the_original_at_batch_1_and_8(outs, out, where):
    folder = outs[out] / where
    manifest = json.loads((outs[out] / "manifest.json").read_text())
    report = json.loads((outs[out] / "report.json").read_text())
    key = report["chosen"] if where == "." else next(k for k, v in manifest["bundle"].items() if v == where)
    with api.load(folder, threads=1) as runner:
        assert runner.key == key == f"{runner.backend}/{runner.precision}"
        assert [(s.name, s.dtype.name, s.shape) for s in runner.inputs] == [("x", "float32", ("N", 3, 16, 16))]
        assert [(s.name, s.dtype.name, s.shape) for s in runner.outputs] == [("logits", "float32", ("N", 10))]
        for batch in (1, 8):
            x = _x(batch, seed=batch)
            (got,) = runner.run({"x": x})
            assert got.shape == (batch, 10)
            assert max_rel_error(run_ort(MODEL, {"x": x})[0], got) <= 1e-5
    with pytest.raises(ConfigError, match="is closed"):
        runner.run({"x": _x(1)})


@pytest.mark.parametrize(("feeds", "message"), [
    ({"y": _x(1)}, "unknown input 'y'; tvm/fp32 takes x: float32[N,3,16,16]"),
    ({}, "missing input 'x'; tvm/fp32 takes x: float32[N,3,16,16]"),
    ({"x": _x(1).astype(np.float64)}, "input 'x' is float64; the artefact takes float32 (convert with .astype)"),
    ({"x": _x(1)[0]}, "input 'x' has 3 dimensions [3, 16, 16]; the artefact takes 4"),
    ({"x": np.zeros((2, 3, 8, 16), np.float32)}, "input 'x' has shape [2, 3, 8, 16]; dimension 2 must be 16"),
    ({"x": [[1.0]]}, "input 'x' is a list, not a numpy array"),
])
def test_bad_feeds_are_one_line_data_errors_naming_the_input(outs, feeds, message):
    with api.load(outs["tvm"]) as runner:
        with pytest.raises(DataError) as info:
            runner.run(feeds)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_not_a_dlopt_folder_and_missing_folder(outs, tmp_path):
    with pytest.raises(ConfigError, match="is not a dlopt output folder"):
        api.load(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        api.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="is not a dlopt output folder"):
        api.load(outs["ort"] / "bundle")  # the folder between the output and its candidates


def test_a_library_for_another_cpu_says_what_the_device_needs(outs, tmp_path):
    out = shutil.copytree(outs["tvm"], tmp_path / "copy")
    record = json.loads((out / "tvm_build.json").read_text())
    record["host"]["mtriple"] = "aarch64-linux-gnu"
    record["form"] = "aarch64 shared library (NEON)"
    (out / "tvm_build.json").write_text(json.dumps(record))
    with pytest.raises(TargetUnavailable, match=r"^tvm/fp32 in .* is an aarch64 shared library \(NEON\) built for "
                                                r"another device \(this machine is x86_64\); run it on a device "
                                                r"with the TVM runtime \(apache-tvm\) for this CPU$"):
        api.load(out)


def test_a_tensorrt_bundle_is_refused_with_what_the_device_needs(tmp_path):
    toml = tmp_path / "jet.toml"
    toml.write_text('[targets.jet]\nbase = "jetson"\nbackends = ["tensorrt"]\n')
    api.compile(MODEL, target="jet", targets_file=toml, out=tmp_path / "o", precision="fp16", runs=20, cache=False)
    with pytest.raises(TargetUnavailable, match=r"tensorrt/fp16 .* engine-build bundle: build the engine on the "
                                                r"device \(\./build_engine\.sh"):
        api.load(tmp_path / "o")


def test_cli_run_writes_what_the_api_returns(outs, tmp_path):
    x = _x(9, seed=5)
    np.savez(tmp_path / "data.npz", x=x)
    for where in (".", "bundle/openvino-fp32"):
        folder = outs["ort"] / where
        result = here("run", folder, "--input", tmp_path / "data.npz", "--output", tmp_path / "preds.npz",
                      "--batch-size", "8")
        assert result.returncode == 0, result.stderr
        line = result.stdout.strip()
        assert line.startswith("ran ") and " on 9 samples in 2 batches of 8 in " in line
        assert line.endswith(f"wrote {tmp_path / 'preds.npz'} (logits float32[9, 10])")
        with np.load(tmp_path / "preds.npz", allow_pickle=False) as preds:
            assert list(preds) == ["logits"]
            with api.load(folder) as runner:
                np.testing.assert_array_equal(preds["logits"], np.concatenate(
                    [runner.run({"x": x[:8]})[0], runner.run({"x": x[8:]})[0]]))
            assert max_rel_error(run_ort(MODEL, {"x": x})[0], preds["logits"]) <= 1e-5
    result = here("run", outs["tvm"], "-i", tmp_path / "data.npz", "-o", tmp_path / "preds.npz", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["candidate"], summary["samples"], summary["batches"], summary["batch_size"]) == ("tvm/fp32", 9, 9, 1)
    assert summary["outputs"] == {"logits": {"dtype": "float32", "shape": [9, 10]}}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


@pytest.mark.parametrize(("case", "args", "message"), [
    ("missing folder", ("{tmp}/nope",), "is not a folder"),
    ("not dlopt's", ("{tmp}",), "is not a dlopt output folder"),
    ("wrong input name", ("{out}",), "data.npz: missing ['x'] and unexpected ['input']"),
    ("output is the input", ("{out}", "-o", "{tmp}/data.npz"), "is the input file; give another name"),
    ("output is a folder", ("{out}", "-o", "{tmp}/adir.npz"), "is a folder; give a file name ending in .npz"),
    ("output not an npz", ("{out}", "-o", "{tmp}/notes.npz"), "exists and is not an .npz archive"),
    ("output suffix", ("{out}", "-o", "{tmp}/preds.txt"), "must end in .npz"),
    ("pickle input", ("{out}", "-i", "{tmp}/pickle.npz"), "holds pickled data"),
])
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(outs, tmp_path, case, args, message):
    np.savez(tmp_path / "data.npz", **({"input": _x(2)} if case == "wrong input name" else {"x": _x(2)}))
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "notes.npz").write_text("my notes\n")
    (tmp_path / "pickle.npz").write_bytes(b"\x80\x04K\x01.")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = [a.format(tmp=tmp_path, out=outs["ort"]) for a in args]
    if "-i" not in argv:
        argv += ["-i", str(tmp_path / "data.npz")]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "preds.npz")]
    result = here("run", *argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dlopt: error: ")
    assert message in result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written


def test_run_help_explains_with_an_example():
    from click.testing import CliRunner

    from dlopt.cli.app import main

    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "dlopt run" in result.output and "bundle/" in result.output


def test_an_artefact_its_runtime_refuses_is_one_line_not_an_internal_error(outs, tmp_path):
    """ORT's Fail on an op of an unknown domain escaped dlopt.load (exit 70 for `dlopt run`)."""
    import onnx
    from onnx import TensorProto, helper

    out = shutil.copytree(outs["ort"], tmp_path / "copy")
    graph = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("com.example", 1)]), out / "model.onnx")
    with pytest.raises(ConfigError, match=r"^ort/fp32 in .*copy cannot be loaded by its runtime: .*com\.example"):
        api.load(out)
    np.savez(tmp_path / "x.npz", x=_x(2))
    result = here("run", out, "--input", tmp_path / "x.npz", "--output", tmp_path / "y.npz")
    assert result.returncode == 2 and "cannot be loaded by its runtime" in result.stderr
    assert not (tmp_path / "y.npz").exists()


def test_the_loaded_runner_is_the_timing_runner_and_is_timed_through_fresh_sessions(outs):
    """One runner concept: what dlopt.load returns is a BaseRunner (lifecycle, inputs, checks, ran_as);
    time_interleaved takes it as it is and opens the artefact afresh between spans."""
    from dlopt.measure.timing import BaseRunner, time_interleaved

    runner = api.load(outs["ort"], threads=1)
    assert isinstance(runner, BaseRunner) and runner.name == runner.key == "ort/fp32" and runner.ran_as == "fp32"
    first = runner._session
    timing = time_interleaved({"ort": runner}, {"x": _x(1)}, runs=20, warmup=2, threads=1, sessions=2)["ort"]
    assert (timing.runs, timing.sessions) == (20, 2) and timing.p50_ms > 0
    assert runner._session is not first and repr(runner).endswith("(open)>")
    runner.close()
    assert repr(runner).endswith("(closed)>")
    with pytest.raises(ConfigError, match="is closed; dlopt.load"):
        runner.run({"x": _x(1)})
