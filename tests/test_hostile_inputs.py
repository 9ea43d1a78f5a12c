"""Hostile or careless input gets one line and exit 2, never exit 70 (issue 9: defects 6, 8, 9, 12)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import models
from cli import dlopt

FAST = ("--precision", "fp32", "--runs", "5", "--samples", "3")


def _one_error_line(result, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlopt: error: "), result.stderr
    assert "Traceback" not in result.stderr and "\x1b[" not in result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (("compile", "m.onnx", "--bogus"), "No such option '--bogus'"),
    (("compile",), "Missing argument 'MODEL'"),
    (("compile", "m.onnx", "--runs", "many"), "'many' is not a valid integer"),
    (("frobnicate",), "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    line = _one_error_line(dlopt(*args, cwd=tmp_path))
    assert message in line and "--help" in line


def test_threads_beyond_the_machines_cores_are_refused(tmp_path):
    models.save(models.conv_bn_relu(channels=4, size=8), tmp_path / "m.onnx")
    line = _one_error_line(dlopt("compile", "m.onnx", "--threads", "100000", *FAST[:2], cwd=tmp_path))
    assert "threads must be between 1 and this machine's" in line and "got 100000" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _reshape_to_seven() -> onnx.ModelProto:
    """Valid and loadable, but fails at run time on any input that does not hold 7 values."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [7])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_original_model_failing_at_run_time_is_a_model_error(tmp_path):
    models.save(_reshape_to_seven(), tmp_path / "m.onnx")
    line = _one_error_line(dlopt("compile", "m.onnx", *FAST, cwd=tmp_path))
    assert line.startswith("dlopt: error: ONNX Runtime cannot run the original model on the random inputs:")
    assert line.endswith("pass representative data with --eval")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_targets_file_with_a_string_for_a_list(tmp_path):
    (tmp_path / "dlopt.toml").write_text('[targets.mine]\nbase = "cpu"\nbackends = "ort"\n')
    line = _one_error_line(dlopt("targets", cwd=tmp_path))
    assert line.endswith('targets.mine.backends must be a list of strings, got \'ort\' (write backends = ["ort"])')


# --- the Python API ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"runs": "5"}, "runs must be an integer, got str '5'"),
    ({"samples": 2.5}, "samples must be an integer or None, got float 2.5"),
    ({"threads": True}, "threads must be an integer or None, got bool True"),
    ({"cache": "no"}, "cache must be True or False, got str 'no'"),
    ({"max_accuracy_drop": float("-inf")}, "max accuracy drop must be a finite number, 0 or more, got -inf"),
    ({"progress": "yes"}, "progress must be True, False, None or a function"),
])
def test_api_wrong_types_are_config_errors(tmp_path, options, message):
    import dlopt
    from dlopt.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        dlopt.compile(models.conv_bn_relu(channels=4, size=8), out=tmp_path / "o", **options)
    assert message in str(info.value)
    assert not (tmp_path / "o").exists()


def test_api_model_of_the_wrong_kind(tmp_path):
    import dlopt
    from dlopt.core.errors import ModelError

    with pytest.raises(ModelError, match="model must be an .onnx path, serialised ONNX bytes or an onnx.ModelProto, "
                                         "got int"):
        dlopt.compile(123, out=tmp_path / "o")
    with pytest.raises(ModelError, match="bytes given as model are not a serialised ONNX model"):
        dlopt.compile(b"\x08\x07garbage\xff", out=tmp_path / "o")


def test_api_accepts_bytes_a_dict_of_inputs_and_progress_true(tmp_path, capsys):
    import dlopt

    proto = models.conv_bn_relu(channels=4, size=8, batch="N")
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    report = dlopt.compile(proto.SerializeToString(), out=tmp_path / "o", precision="fp32", runs=3,
                           inputs={"x": x}, progress=True)
    assert report.chosen == "ort/fp32"
    assert report.evaluation["source"] == "dict" and report.to_dict()["evaluation"]["feeds"] >= 1
    assert (tmp_path / "o" / "model.onnx").is_file()


# --- NaN never passes verification --------------------------------------------------------------

def test_all_nan_outputs_fail_verification():
    from dlopt.flow.candidates import judge
    from dlopt.measure.evaluate import compare
    from dlopt.core.precisions import Status

    reference = [[np.array([[1.0, 2.0, 3.0]], np.float32)], [np.array([[0.5, 0.1, 0.2]], np.float32)]]
    nan = [[np.full((1, 3), np.nan, np.float32)], [np.full((1, 3), np.nan, np.float32)]]
    fidelity = compare(reference, nan)
    assert fidelity.non_finite == "NaN in output 0 on feed 0" and fidelity.max_rel_error == float("inf")
    for precision in ("fp32", "int8"):
        status, reason = judge(precision, fidelity.to_dict(), {"metric": "top-1 agreement", "drop_pp": 0.0}, 1.0)
        assert status is Status.REJECTED
        assert reason == "produces NaN in output 0 on feed 0 where the original is finite"


def test_inf_where_the_reference_is_finite_and_matching_inf_is_fine():
    from dlopt.measure.evaluate import compare

    reference = [[np.array([1.0, np.inf], np.float32)]]
    assert compare(reference, [[np.array([1.0, np.inf], np.float32)]]).non_finite is None
    assert compare(reference, [[np.array([1.0, np.inf], np.float32)]]).max_abs_error == 0.0
    assert compare(reference, [[np.array([np.inf, np.inf], np.float32)]]).non_finite == "Inf in output 0 on feed 0"
