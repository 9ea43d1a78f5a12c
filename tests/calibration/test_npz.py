"""NpzDataset streams an .npz batch by batch and checks it against the model from the headers."""

import pickle
import re

import numpy as np
import pytest

from dlopt.calibration import NpzDataset, open_dataset
from dlopt.core.errors import DataError
from dlopt.core.specs import InputSpec

F32 = np.dtype(np.float32)
SPECS = [InputSpec("x", F32, ("N", 3, 4)), InputSpec("ids", np.dtype(np.int64), ("N", 2))]
EXPECTS = "; the model expects x: float32[N,3,4], ids: int64[N,2]"
TAIL = re.escape(EXPECTS) + "$"


def _arrays(n=37, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 3, 4)).astype(np.float32),
            "ids": rng.integers(0, 1000, (n, 2)).astype(np.int64),
            "labels": rng.integers(0, 10, n)}


@pytest.fixture(params=["stored", "deflated"])
def npz(request, tmp_path):
    path = tmp_path / "data.npz"
    (np.savez if request.param == "stored" else np.savez_compressed)(path, **_arrays())
    return path


def test_streams_the_same_data_as_np_load_in_batches(npz):
    data = open_dataset(npz, SPECS, batch_size=8)
    batches = list(data.iter_with_labels())
    assert [len(feed["x"]) for feed, _ in batches] == [8, 8, 8, 8, 5]
    assert data.samples == 37 and len(data) == 5 and data.has_labels
    with np.load(npz) as ref:
        for i, (feed, labels) in enumerate(batches):
            assert set(feed) == {"x", "ids"}
            np.testing.assert_array_equal(feed["x"], ref["x"][8 * i : 8 * i + 8])
            np.testing.assert_array_equal(feed["ids"], ref["ids"][8 * i : 8 * i + 8])
            np.testing.assert_array_equal(labels, ref["labels"][8 * i : 8 * i + 8])
            assert feed["x"].dtype == np.float32 and feed["x"].flags.writeable
        np.testing.assert_array_equal(np.concatenate(data.label_batches()), ref["labels"])


def test_limit_caps_samples_and_batches(npz):
    data = open_dataset(npz, SPECS, batch_size=4, limit=10)
    assert data.samples == 10 and len(data) == 3
    assert [len(b["x"]) for b in data] == [4, 4, 2]
    assert [len(lab) for lab in data.label_batches()] == [4, 4, 2]
    assert [len(b["x"]) for b in open_dataset(npz, SPECS, limit=3)] == [1, 1, 1]  # default batch: 1


def test_fixed_batch_dimension_gets_whole_batches_only(npz):
    specs = [InputSpec("x", F32, (4, 3, 4)), InputSpec("ids", np.dtype(np.int64), (4, 2))]
    data = open_dataset(npz, specs, batch_size=32)  # the model's 4 wins
    assert data.samples == 36 and len(data) == 9
    assert {len(b["x"]) for b in data} == {4}
    assert len(data.label_batches()) == 9
    with pytest.raises(DataError, match="3 samples, fewer than the model's fixed batch of 4"):
        open_dataset(npz, specs, limit=3)


def test_driver_compatibility(npz):
    data = NpzDataset(npz, SPECS)  # batch_size 32, as the driver uses it
    feeds = list(data)
    assert [len(f["x"]) for f in feeds] == [32, 5] and data.samples == 37
    assert [len(lab) for lab in data.label_batches()] == [32, 5]


def test_without_labels_label_batches_is_empty(tmp_path):
    arrays = _arrays(5)
    del arrays["labels"]
    np.savez(tmp_path / "d.npz", **arrays)
    data = NpzDataset(tmp_path / "d.npz", SPECS)
    assert data.label_batches() == [] and not data.has_labels
    assert [label for _, label in data.iter_with_labels()] == [None]


def test_big_endian_arrays_are_read_as_native(tmp_path):
    arrays = _arrays(6)
    expected = arrays["x"].copy()
    arrays["x"] = arrays["x"].astype(">f4")
    np.savez(tmp_path / "d.npz", **arrays)
    (feed,) = list(NpzDataset(tmp_path / "d.npz", SPECS))
    assert feed["x"].dtype == np.float32
    np.testing.assert_array_equal(feed["x"], expected)


def _write(tmp_path, case):
    path = tmp_path / "bad.npz"
    arrays = _arrays(37)
    if case == "names":
        arrays["z"] = arrays.pop("x")
    elif case == "dtype":
        arrays["x"] = arrays["x"].astype(np.float64)
    elif case == "shape":
        arrays["x"] = np.zeros((37, 3, 5), np.float32)
    elif case == "rank":
        arrays["x"] = np.zeros((37, 12), np.float32)
    elif case == "counts":
        arrays["ids"] = arrays["ids"][:30]
    elif case == "empty":
        arrays = {"x": np.zeros((0, 3, 4), np.float32), "ids": np.zeros((0, 2), np.int64)}
    elif case == "object":
        arrays["x"] = np.array([[1, "a"]], dtype=object)
    elif case == "float_labels":
        arrays["labels"] = arrays["labels"].astype(np.float32)
    elif case == "fortran":
        arrays["x"] = np.asfortranarray(arrays["x"])
    elif case == "pickle":
        path.write_bytes(pickle.dumps(arrays))
        return path
    elif case == "npy":
        np.save(tmp_path / "bad.npy", arrays["x"])
        (tmp_path / "bad.npy").rename(path)
        return path
    elif case == "not_zip":
        path.write_text("x,ids\n1,2\n")
        return path
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, message", [
    ("names", r"bad.npz: missing \['x'\] and unexpected \['z'\]" + TAIL),
    ("dtype", "'x' is float64" + TAIL),
    ("shape", r"'x' has shape \[37, 3, 5\] \(first axis = samples\); input x: float32\[N,3,4\]: each sample is "
              r"the whole tensor as fed \(\[samples, N, 3, 4\]\) or one item along batch axis 0 \(\[samples, 3, 4\]\)"
     + TAIL),
    ("rank", r"'x' has shape \[37, 12\]"),
    ("counts", "arrays disagree on the number of samples"),
    ("empty", "bad.npz holds no samples" + TAIL),
    ("object", "holds pickled data; dlopt never unpickles data files"),
    ("pickle", "holds pickled data; dlopt never unpickles data files"),
    ("npy", "is a single .npy array; expected an .npz"),
    ("not_zip", r"is not an .npz file \(not a zip archive\)"),
    ("float_labels", "'labels' must be a 1-D integer array"),
    ("fortran", "Fortran"),
])
def test_bad_files_fail_on_open_with_one_line(tmp_path, case, message):
    path = _write(tmp_path, case)
    with pytest.raises(DataError, match=message) as info:
        NpzDataset(path, SPECS)  # from the headers alone: no iteration needed
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(EXPECTS) == (case in ("names", "dtype", "shape", "rank", "empty"))


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_values_name_input_and_batch(tmp_path, bad, word):
    arrays = _arrays(37)
    arrays["x"][20, 1, 2] = bad
    np.savez(tmp_path / "d.npz", **arrays)
    data = NpzDataset(tmp_path / "d.npz", SPECS, batch_size=8)
    batches = iter(data)
    assert len(next(batches)["x"]) == 8  # the first batches stream before the bad one is met
    with pytest.raises(DataError, match=rf"d.npz: 'x' contains {word} values in batch 2 \(samples 16-23\)$"):
        list(batches)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        NpzDataset(tmp_path / "absent.npz", SPECS)
