"""Bad input gives one line on stderr, exit code 2, no traceback and nothing written.

The refusals run in this process (tests/serving.py ``dlopt_in``: the console script's command, option
checks, printing and error-to-exit-code mapping, without 1.5 CPU-seconds of start-up each); two of them, a
model refused at load and a target refused at lookup, still run the installed console script, so a warning or
traceback that only a fresh process prints would show there."""

from __future__ import annotations

import numpy as np
import pytest

import models
from cli import dlopt
from serving import dlopt_in as here


def _missing(tmp):
    return tmp / "nope.onnx"


def _directory(tmp):
    (tmp / "adir.onnx").mkdir()
    return tmp / "adir.onnx"


def _empty(tmp):
    (tmp / "empty.onnx").write_bytes(b"")
    return tmp / "empty.onnx"


def _not_onnx(tmp):
    path = tmp / "notes.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    return path


def _random_bytes(tmp):
    data = np.random.default_rng(7).bytes(4096)
    path = tmp / "random.onnx"
    path.write_bytes(b"\xff" + data)  # never starts like a ModelProto
    return path


def _truncated(tmp):
    data = models.conv_bn_relu().SerializeToString()
    path = tmp / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _fails_checker(tmp):
    model = models.conv_bn_relu()
    model.graph.node[0].input[0] = "undefined_tensor"  # consumes a value nothing produces
    path = tmp / "invalid.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _cycle(tmp):
    model = models.conv_bn_relu()
    model.graph.node[0].input[0] = "relu"  # conv consumes the relu that depends on it
    path = tmp / "cycle.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _dangling_input(tmp):
    model = models.conv_bn_relu()
    model.graph.node[3].input[0] = "ghost"
    path = tmp / "dangling.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _unknown_domain(tmp):
    from onnx import helper

    model = models.conv_bn_relu()
    model.graph.node[2].domain, model.graph.node[2].op_type = "com.example", "Frob"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp / "custom.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _future_opset(tmp):
    model = models.conv_bn_relu()
    model.opset_import[0].version = 99
    path = tmp / "future.onnx"
    path.write_bytes(model.SerializeToString())
    return path


CASES = [
    (_missing, "model file not found"),
    (_directory, "got a directory"),
    (_empty, "is empty (0 bytes)"),
    (_not_onnx, "is not an ONNX model"),
    (_random_bytes, "is not an ONNX model"),
    (_truncated, "is a truncated or corrupt ONNX file"),
    (_fails_checker, "fails onnx.checker"),
    (_cycle, "must be topologically sorted, however input 'relu' of node: name: conv"),
    (_dangling_input, "input 'ghost'"),
    (_unknown_domain, "uses ops no ONNX schema or runtime defines: com.example.Frob"),
    (_future_opset, "uses ai.onnx opset 99, newer than the"),
]


def _assert_clean_failure(result, message, workdir, before):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dlopt: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written, no temp folders


@pytest.mark.parametrize("make,message", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_model(tmp_path, make, message):
    model = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    run = dlopt if make is _truncated else here  # one model refusal from the console script itself
    result = run("compile", model, "--target", "cpu", "-o", tmp_path / "out", cwd=tmp_path)
    _assert_clean_failure(result, message, tmp_path, before)


@pytest.mark.parametrize("make,message", CASES[:4], ids=[c[0].__name__.strip("_") for c in CASES[:4]])
def test_inspect_bad_model(tmp_path, make, message):
    model = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_clean_failure(here("inspect", model, cwd=tmp_path), message, tmp_path, before)


def test_unknown_target_lists_known_ones(tmp_path):
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    result = dlopt("compile", model, "--target", "pdp11", "-o", tmp_path / "out", cwd=tmp_path)
    _assert_clean_failure(result, "unknown target 'pdp11'; known targets: ", tmp_path, ["m.onnx"])
    for name in ("cpu", "jetson", "rpi5", "cortex-m7"):
        assert name in result.stderr


def test_output_folder_that_is_not_ours_is_refused(tmp_path):
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    result = here("compile", model, "-o", precious, cwd=tmp_path)
    _assert_clean_failure(result, "is not a dlopt output", tmp_path, ["m.onnx", "precious"])
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]


def test_external_data_outside_model_folder_is_refused(tmp_path):
    model = models.conv_bn_relu()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = 1  # EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    result = here("compile", path, "-o", tmp_path / "out", cwd=tmp_path)
    _assert_clean_failure(result, "outside the model's folder", tmp_path, ["m"])


def test_pickled_inputs_refused(tmp_path):
    import pickle

    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    (tmp_path / "data.npz").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    result = here("compile", model, "--inputs", tmp_path / "data.npz", "-o", tmp_path / "out", cwd=tmp_path)
    _assert_clean_failure(result, "pickled", tmp_path, ["data.npz", "m.onnx"])


def test_inputs_with_wrong_names_list_what_the_model_expects(tmp_path):
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", image=np.zeros((4, 3, 16, 16), np.float32))
    result = here("compile", model, "--inputs", tmp_path / "data.npz", "-o", tmp_path / "out", cwd=tmp_path)
    _assert_clean_failure(result, "missing ['x'] and unexpected ['image']; the model expects x: float32[1,3,16,16]",
                          tmp_path, ["data.npz", "m.onnx"])


def _calib_case(tmp_path, arrays=None, raw=None):
    model = models.save(models.conv_bn_relu(batch="N"), tmp_path / "m.onnx")
    path = tmp_path / "calib.npz"
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.savez(path, **arrays)
    result = here("compile", model, "--precision", "int8", "--calib", path, "-o", tmp_path / "out", cwd=tmp_path)
    return result, sorted(p.name for p in tmp_path.iterdir() if p.name != "out")


GOOD = np.zeros((8, 3, 16, 16), np.float32)
EXPECTS = "the model expects x: float32[N,3,16,16]"


@pytest.mark.parametrize("arrays,message", [
    ({"image": GOOD}, "missing ['x'] and unexpected ['image']; " + EXPECTS),
    ({"x": GOOD.astype(np.float64)}, EXPECTS),
    ({"x": np.zeros((8, 3, 20, 20), np.float32)}, EXPECTS),
    ({"x": np.zeros((0, 3, 16, 16), np.float32)}, "no samples"),
    ({"x": np.where(np.arange(GOOD.size).reshape(GOOD.shape) == 5, np.nan, GOOD).astype(np.float32)}, "NaN"),
    ({"x": np.full(GOOD.shape, np.inf, np.float32)}, "Inf"),
], ids=["names", "dtype", "shape", "empty", "nan", "inf"])
def test_bad_calibration_data(tmp_path, arrays, message):
    result, before = _calib_case(tmp_path, arrays=arrays)
    _assert_clean_failure(result, message, tmp_path, before)


def test_pickled_calibration_data_refused(tmp_path):
    import pickle

    result, before = _calib_case(tmp_path, raw=pickle.dumps({"x": GOOD}))
    _assert_clean_failure(result, "pickled", tmp_path, before)
