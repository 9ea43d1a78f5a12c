"""Loading a folder someone else wrote (issue 23): its settings files may not move writes out of the folder,
start hundreds of threads, or reach ORT's external data outside it; `dlopt run -o` replaces only its own files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models
from cli import dlopt

import dlopt as api
from dlopt.core.errors import ConfigError

AWAY = '[targets.away]\nbase = "cpu"\nbackends = ["ort", "openvino", "tvm"]\ncpu_flags = ["dlopt-test-not-this-cpu"]\n'
MODEL = models.conv_bn_relu(channels=8, size=16, batch="N")
CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """ort/fp32 at the top, openvino/fp32 and tvm/fp32 in bundle/ (nothing timed: a target that is not here)."""
    tmp = tmp_path_factory.mktemp("loader")
    (tmp / "away.toml").write_text(AWAY)
    report = api.compile(MODEL, target="away", targets_file=tmp / "away.toml", out=tmp / "out", precision="fp32",
                         runs=20, cache=False)
    assert report.chosen == "ort/fp32"
    return tmp / "out"


@pytest.fixture
def copy(out, tmp_path):
    return shutil.copytree(out, tmp_path / "copy", symlinks=True)


def _x(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def _edit(path, change) -> None:
    settings = json.loads(path.read_text())
    change(settings)
    path.write_text(json.dumps(settings))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


# -- item 15: thread and stream counts from a settings file are clamped to this machine's cores --------

def test_ort_thread_counts_from_the_file_are_clamped_to_the_cores(copy):
    def many(s):
        s.update(intra_op_num_threads=3000, inter_op_num_threads=3000, execution_mode="ORT_PARALLEL")
    _edit(copy / "session_options.json", many)
    before = _threads()
    with api.load(copy) as runner:
        options = runner._session._session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (CORES, CORES)
        assert _threads() - before <= 2 * CORES + 2  # 3000 + 3000 before
        (y,) = runner.run({"x": _x()})
        assert y.shape == (2, 10)


@pytest.mark.parametrize("bad", [-5, "many", 2.5, True, None])
def test_ort_thread_counts_that_are_not_counts_are_one_line_errors(copy, bad):
    _edit(copy / "session_options.json", lambda s: s.update(inter_op_num_threads=bad))
    with pytest.raises(ConfigError, match=r"session_options\.json: inter_op_num_threads must be a whole number "
                                          r"of threads \(0 for the runtime's default\), got "):
        api.load(copy)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["config_entries"].update({"ep.context_enable": "1", "ep.context_file_path": "/tmp/x.onnx"}),
     "sets ONNX Runtime config entry 'ep.context_enable', which dlopt does not write"),
    (lambda s: s.update(graph_optimization_level="__class__"), "graph_optimization_level '__class__' is not one"),
    (lambda s: s.update(execution_mode=7), "execution_mode 7 is not one of ONNX Runtime's ExecutionMode names"),
])
def test_ort_settings_dlopt_would_not_write_are_one_line_errors(copy, change, message):
    _edit(copy / "session_options.json", change)
    with pytest.raises(ConfigError, match="session_options.json") as caught:
        api.load(copy)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_openvino_threads_and_streams_from_the_file_are_clamped_to_the_cores(copy):
    def many(s):
        s["properties"].update(INFERENCE_NUM_THREADS=400, NUM_STREAMS=3000, PERFORMANCE_HINT="THROUGHPUT")
    _edit(copy / "bundle/openvino-fp32/runtime_config.json", many)
    with api.load(copy / "bundle/openvino-fp32") as runner:
        compiled = runner._session.compiled
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) <= CORES
        assert int(compiled.get_property("NUM_STREAMS")) <= CORES
        assert runner.run({"x": _x()})[0].shape == (2, 10)


def test_tvm_threads_from_the_file_are_clamped_to_the_cores(copy):
    _edit(copy / "bundle/tvm-fp32/tvm_build.json", lambda s: s.update(threads=3000))
    before = _threads()
    with api.load(copy / "bundle/tvm-fp32") as runner:
        assert runner._session.threads <= CORES
        assert runner.run({"x": _x()})[0].shape == (2, 10)
        assert _threads() - before <= CORES + 2


# -- item 11: only the OpenVINO properties dlopt writes reach compile_model -----------------------------

def test_openvino_properties_dlopt_does_not_write_are_refused_and_nothing_is_written(copy, tmp_path):
    cache = tmp_path / "elsewhere"
    _edit(copy / "bundle/openvino-fp32/runtime_config.json",
          lambda s: s["properties"].update(CACHE_DIR=str(cache)))
    np.savez(tmp_path / "x.npz", x=_x())
    result = dlopt("run", copy / "bundle/openvino-fp32", "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "runtime_config.json sets OpenVINO property 'CACHE_DIR', which dlopt does not write" in result.stderr
    assert not cache.exists() and not (tmp_path / "y.npz").exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.update(device="HETERO:CPU"), "device 'HETERO:CPU'; dlopt artefacts run on CPU"),
    (lambda s: s["properties"].update(INFERENCE_PRECISION_HINT="i8"), "INFERENCE_PRECISION_HINT 'i8'"),
    (lambda s: s["properties"].update(PERFORMANCE_HINT={"x": 1}), "PERFORMANCE_HINT {'x': 1}"),
    (lambda s: s.update(properties=["CACHE_DIR"]), "properties must be a JSON object"),
])
def test_openvino_settings_dlopt_would_not_write_are_one_line_errors(copy, change, message):
    _edit(copy / "bundle/openvino-fp32/runtime_config.json", change)
    with pytest.raises(ConfigError, match="runtime_config.json") as caught:
        api.load(copy / "bundle/openvino-fp32")
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- item 21: ORT refusing external data outside the folder is one line ---------------------------------

@pytest.mark.parametrize("where", ["../secret.bin", "{abs}"])
def test_external_data_outside_the_folder_is_a_one_line_error(copy, tmp_path, where):
    secret = tmp_path / "secret.bin"
    proto = onnx.load(str(copy / "model.onnx"))
    tensor = proto.graph.initializer[0]
    raw = numpy_helper.to_array(tensor).tobytes()
    secret.write_bytes(raw)
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", where.format(abs=secret)), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (copy / "model.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ConfigError, match=r"^ort/fp32 in .* cannot be loaded by its runtime: .*[Ee]xternal data"):
        api.load(copy)
    np.savez(tmp_path / "x.npz", x=_x())
    result = dlopt("run", copy, "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "External data path" in result.stderr
    assert secret.read_bytes() == raw and not (tmp_path / "y.npz").exists()


# -- item 7: `dlopt run -o` replaces only a file dlopt run wrote, and keeps its mode -------------------

def test_run_refuses_to_replace_a_users_npz_and_keeps_its_mode(out, tmp_path):
    np.savez(tmp_path / "x.npz", x=_x())
    mine = tmp_path / "mine.npz"
    np.savez(mine, secret=np.arange(3))
    os.chmod(mine, 0o600)
    before = mine.read_bytes()
    result = dlopt("run", out, "-i", tmp_path / "x.npz", "-o", mine)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"--output {mine} exists and was not written by dlopt run; dlopt will not replace it" in result.stderr
    assert mine.read_bytes() == before and stat.S_IMODE(mine.stat().st_mode) == 0o600


def test_run_replaces_its_own_output_keeping_the_mode_the_user_gave_it(out, tmp_path):
    np.savez(tmp_path / "x.npz", x=_x(2))
    preds = tmp_path / "preds.npz"
    assert dlopt("run", out, "-i", tmp_path / "x.npz", "-o", preds).returncode == 0
    assert stat.S_IMODE(preds.stat().st_mode) == 0o644
    assert zipfile.ZipFile(preds).comment == b"written by dlopt run"
    os.chmod(preds, 0o600)
    np.savez(tmp_path / "x.npz", x=_x(3))
    result = dlopt("run", out, "-i", tmp_path / "x.npz", "-o", preds)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(preds.stat().st_mode) == 0o600
    with np.load(preds, allow_pickle=False) as got:
        assert list(got) == ["logits"] and got["logits"].shape == (3, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.npz", "x.npz"]  # no temporary file left


# -- item 5 at dlopt.load: a swapped TVM library is refused before it is loaded ------------------------

def test_load_refuses_a_swapped_library_and_its_constructor_never_runs(copy, tmp_path):
    marker = tmp_path / "marker"
    source = tmp_path / "evil.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) {\n'
                      f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}\n}}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(copy / "bundle/tvm-fp32/model.so"), str(source)],
                   check=True, timeout=60)
    with pytest.raises(ConfigError, match=r"bundle/tvm-fp32/model\.so in .* sha256 differs"):
        api.load(copy / "bundle/tvm-fp32")
    np.savez(tmp_path / "x.npz", x=_x())
    result = dlopt("run", copy / "bundle/tvm-fp32", "-i", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "sha256 differs" in result.stderr
    assert not marker.exists() and not (tmp_path / "y.npz").exists()
    with api.load(copy) as runner:  # the ONNX Runtime candidate beside it loads no native code: it runs
        assert runner.run({"x": _x()})[0].shape == (2, 10)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
