"""Every input a real model has: a state whose batch axis is not first, a scalar sample rate with a
branch on it (tests/stateful.py), given as items, as whole tensors, or once with --const."""

import json

import numpy as np
import onnxruntime as ort
import pytest

import dlopt
from dlopt.calibration import open_dataset
from dlopt.core.errors import ConfigError, DataError
from dlopt.core.specs import input_specs
from tests.cli import dlopt as run_cli
from tests.stateful import stateful_vad

N = 12
ORT_ONLY = '[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n'


@pytest.fixture(scope="module")
def vad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vad")
    path = stateful_vad(folder / "vad.onnx")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, 64)).astype(np.float32)
    state = (rng.standard_normal((N, 2, 16)) * 0.3).astype(np.float32)
    np.savez(folder / "items.npz", x=x, state=state, sr=np.full(N, 16000, np.int64))
    np.savez(folder / "whole.npz", x=x, state=state[:, :, None, :], sr=np.full(N, 16000, np.int64))
    np.savez(folder / "no_sr.npz", x=x, state=state)
    np.savez(folder / "scalar_sr.npz", x=x, state=state, sr=np.array(16000))
    np.savez(folder / "state_first.npz", x=x, state=state.transpose(1, 0, 2).copy(), sr=np.full(2, 16000, np.int64))
    return folder, path, x, state


def _specs(path):
    import onnx

    return input_specs(onnx.load(path))


def test_items_along_a_later_batch_axis_and_whole_tensors_feed_the_model_sample_by_sample(vad):
    folder, path, x, state = vad
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name in ("items.npz", "whole.npz"):
        data = open_dataset(folder / name, _specs(path), batch_size=32)
        feeds = list(data)
        assert len(feeds) == N and data.samples == N  # a scalar is whole: one sample per feed
        assert feeds[5]["state"].shape == (2, 1, 16) and feeds[5]["sr"].shape == () and int(feeds[5]["sr"]) == 16000
        np.testing.assert_array_equal(feeds[5]["state"][:, 0], state[5])
        np.testing.assert_array_equal(feeds[5]["x"], x[5:6])
        prob, new_state = session.run(None, feeds[5])
        assert prob.shape == (1, 1) and new_state.shape == (2, 1, 16)
    # --const supplies what the file lacks, in every feed
    const = open_dataset(folder / "no_sr.npz", _specs(path), constants={"sr": np.array(16000, np.int64)})
    assert all(int(f["sr"]) == 16000 for f in const)


@pytest.mark.parametrize("name, message", [
    ("scalar_sr.npz", r"'sr' is a scalar; an array holds N samples along its first axis \(a scalar input is given as "
                      r"N scalars, or once with --const sr=VALUE\)"),
    ("state_first.npz", r"'state' has shape \[2, 12, 16\] \(first axis = samples\); input state: float32\[2,batch,16\]:"
                        r" each sample is the whole tensor as fed \(\[samples, 2, batch, 16\]\) or one item along "
                        r"batch axis 1 \(\[samples, 2, 16\]\)"),
    ("no_sr.npz", r"missing \['sr'\]"),
])
def test_data_that_fits_no_rule_is_one_line_naming_the_input_and_the_rule(vad, name, message):
    folder, path, _, _ = vad
    with pytest.raises(DataError, match=message) as info:
        open_dataset(folder / name, _specs(path))
    assert "\n" not in str(info.value)


def test_compile_reaches_a_verdict_on_items_whole_tensors_and_constants(vad, tmp_path):
    folder, path, _, _ = vad
    # the first compile builds every CPU backend from the stateful model; the other three read the same model
    # from other data, which is dlopt's reading whichever backend builds: ONNX Runtime alone
    (tmp_path / "t.toml").write_text(ORT_ONLY)
    for i, options in enumerate([{"inputs": folder / "items.npz"}, {"inputs": folder / "whole.npz"},
                                 {"inputs": folder / "no_sr.npz", "constants": {"sr": 16000}},
                                 {"constants": {"sr": 16000, "state": 0.0}}]):
        narrow = {} if i == 0 else {"target": "here", "targets_file": tmp_path / "t.toml"}
        report = dlopt.compile(path, out=tmp_path / f"o{i}", precision="fp32", runs=5, warmup=1, **narrow, **options)
        assert report.chosen is not None
        if i == 0:
            built = {c.backend for c in report.candidates if c.status == "ok"}
            assert {"ort", "openvino", "tvm"} <= built, built
        assert report.to_dict()["timing"]["shapes"] == {"x": [1, 64], "state": [2, 1, 16], "sr": []}
        samples = report.to_dict()["evaluation"]["samples"]
        assert samples == (N if "inputs" in options else 20)


def test_random_inputs_name_const_for_a_scalar_that_picks_a_failing_branch(vad, tmp_path):
    folder, path, _, _ = vad
    result = run_cli("compile", path, "-o", tmp_path / "o", "--precision", "fp32", "--runs", "5")
    assert result.returncode == 2, result.stderr
    assert "pass representative data with --eval or the value of sr with --const NAME=VALUE" in result.stderr
    # the --const that fixes it is read before any backend builds: ONNX Runtime alone, timed briefly
    (tmp_path / "t.toml").write_text(ORT_ONLY)
    result = run_cli("compile", path, "-o", tmp_path / "o", "--precision", "fp32", "--runs", "5", "--warmup", "1",
                     "--target", "here", "--targets-file", tmp_path / "t.toml", "--const", "sr=16000", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chosen"] == "ort/fp32"


def test_const_errors_are_one_line(vad):
    _, path, _, _ = vad
    from dlopt.core.inputs import constant_arrays

    specs = _specs(path)
    with pytest.raises(ConfigError, match="the model has no input 'rate'"):
        constant_arrays(specs, {"rate": 1})
    with pytest.raises(ConfigError, match=r"cannot be fed as state: float32\[2,batch,16\]"):
        constant_arrays(specs, {"state": np.zeros((2, 16))})
    assert constant_arrays(specs, {"state": 0.5})["state"].shape == (2, 1, 16)
    with pytest.raises(ConfigError, match="--const takes NAME=NUMBER"):
        from dlopt.core.shapes import parse_const

        parse_const("sr=fast")
