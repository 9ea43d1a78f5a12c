"""Iterables, generators and torch DataLoaders as calibration sources, re-batched and checked."""

import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dlopt.calibration import StreamDataset, open_dataset
from dlopt.core.errors import ConfigError, DataError
from dlopt.core.specs import InputSpec

F32 = np.dtype(np.float32)
ONE = [InputSpec("x", F32, ("N", 2))]
TWO = [InputSpec("a", F32, ("N", 2)), InputSpec("b", np.dtype(np.int64), ("N",))]


def _rows(n, start=0):
    return np.arange(start * 2, (start + n) * 2, dtype=np.float32).reshape(n, 2)


def test_list_of_feed_dicts_is_rebatched_across_chunk_boundaries():
    chunks = [{"x": _rows(3, 0)}, {"x": torch.from_numpy(_rows(4, 3))}, {"x": _rows(2, 7)}]
    data = open_dataset(chunks, ONE, batch_size=4)
    batches = [b["x"] for b in data]
    assert [len(b) for b in batches] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(batches), _rows(9))
    assert all(isinstance(b, np.ndarray) for b in batches)
    assert data.samples == 9 and len(data) == 3  # known after the first pass


def test_source_batches_are_kept_without_batch_size():
    data = open_dataset([{"x": _rows(3)}, {"x": _rows(5, 3)}], ONE)
    assert [len(b["x"]) for b in data] == [3, 5]
    with pytest.raises(TypeError):
        len(open_dataset([{"x": _rows(3)}], ONE))  # unknown before a pass


def test_fixed_batch_rebatches_and_drops_the_remainder():
    specs = [InputSpec("x", F32, (2, 2))]
    data = open_dataset([{"x": _rows(3)}, {"x": _rows(4, 3)}], specs)
    batches = [b["x"] for b in data]
    assert [len(b) for b in batches] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate(batches), _rows(6))
    with pytest.raises(DataError, match="1 samples, fewer than the model's fixed batch of 2"):
        list(open_dataset([{"x": _rows(1)}], specs))


def test_limit_stops_pulling_from_a_generator():
    pulled = []

    def feeds():
        for i in range(1000):
            pulled.append(i)
            yield {"x": _rows(3, 3 * i)}

    data = open_dataset(feeds(), ONE, limit=7, batch_size=2)
    batches = [b["x"] for b in data]
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), _rows(7))
    assert pulled == [0, 1, 2]
    with pytest.raises(DataError, match="one-pass iterator and was read already"):
        list(data)


def test_tuples_with_labels_and_mixed_labels():
    items = [(_rows(2), np.array([1, 2], np.int64), np.array([7, 8])),
             (_rows(2, 2), np.array([3, 4], np.int64), np.array([9, 9]))]
    data = open_dataset(items, TWO)
    pairs = list(data.iter_with_labels())
    np.testing.assert_array_equal(pairs[1][0]["b"], [3, 4])
    assert [lab.tolist() for _, lab in pairs] == [[7, 8], [9, 9]]
    assert data.label_batches()[0].tolist() == [7, 8]
    items[1] = items[1][:2]
    with pytest.raises(DataError, match="batch 1 has no labels but earlier batches do"):
        list(open_dataset(items, TWO))


def test_a_dict_of_arrays_is_one_chunk():
    data = open_dataset({"a": _rows(5), "b": np.arange(5), "labels": np.arange(5) % 2}, TWO, batch_size=2)
    assert [len(b["a"]) for b in data] == [2, 2, 1]
    assert np.concatenate(data.label_batches()).tolist() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("items, message, names_model", [
    ([{"x": _rows(2), "y": _rows(2)}], r"batch 0: unexpected \['y'\]", True),
    ([{"x": _rows(2)}, {}], r"batch 1: missing \['x'\]", True),
    ([{"x": _rows(2).astype(np.float64)}], r"'x' is float64 in batch 0 \(samples 0-1\)", True),
    ([{"x": _rows(2)}, {"x": np.zeros((2, 3), np.float32)}],
     r"'x' has shape \[2, 3\] in batch 1 \(samples 2-3\)", True),
    ([{"x": np.zeros(2, np.float32)}], r"'x' has shape \[2\] in batch 0", True),
    ([{"x": [[1.0, 2.0]]}], "'x' in batch 0 is a list, not a numpy array", True),
    ([(_rows(1), _rows(1), _rows(1))], "batch 0 is a tuple of 3 items; expected 1", True),
    (["x"], "batch 0 is a str; expected a dict of arrays", True),
    ([], r"calibration data \(list\) holds no samples", True),
    ([(_rows(2), np.array([0.5, 1.5]))], "labels in batch 0 .* must be an integer array", False),
])
def test_bad_items_raise_one_line_data_errors(items, message, names_model):
    with pytest.raises(DataError, match=message) as info:
        list(open_dataset(items, ONE))
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("; the model expects x: float32[N,2]") == names_model


def test_nan_is_found_in_the_batch_it_is_in():
    chunk = _rows(6)
    chunk[4, 1] = np.nan
    with pytest.raises(DataError, match=re.escape("'x' contains NaN values in batch 1 (samples 3-5)")):
        list(open_dataset([{"x": chunk[:3]}, {"x": chunk[3:]}], ONE, batch_size=2))


def test_bad_sources_and_options():
    with pytest.raises(DataError, match="cannot read calibration data from a int"):
        open_dataset(3, ONE)
    with pytest.raises(DataError, match="wrap a torch Dataset in one"):
        open_dataset(_Samples(), ONE)
    with pytest.raises(ConfigError, match="limit must be a positive integer"):
        open_dataset([], ONE, limit=0)
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        open_dataset([], ONE, batch_size=1.5)


class _Samples(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"a": torch.full((2,), float(i)), "b": torch.tensor(i), "labels": torch.tensor(i % 3)}


def test_dataloader_of_tuples_with_labels():
    x, y = torch.from_numpy(_rows(10)), torch.arange(10) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    data = open_dataset(loader, ONE)
    assert data.where == "calibration data (DataLoader)"
    pairs = list(data.iter_with_labels())
    assert [len(f["x"]) for f, _ in pairs] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f, _ in pairs]), _rows(10))
    assert np.concatenate([lab for _, lab in pairs]).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert [len(f["x"]) for f in open_dataset(loader, ONE, batch_size=3, limit=8)] == [3, 3, 2]


def test_dataloader_of_dicts_and_of_tensors():
    data = open_dataset(DataLoader(_Samples(), batch_size=4), TWO)
    feeds = list(data)
    np.testing.assert_array_equal(feeds[2]["a"], [[8, 8], [9, 9]])
    assert feeds[0]["b"].tolist() == [0, 1, 2, 3] and feeds[0]["b"].dtype == np.int64
    assert np.concatenate(data.label_batches()).tolist() == [i % 3 for i in range(10)]
    tensors = DataLoader(torch.from_numpy(_rows(5)), batch_size=2)
    assert [f["x"].tolist() for f in StreamDataset(tensors, ONE)][-1] == [[8.0, 9.0]]
    with pytest.raises(DataError, match="batch 0 is a single array but the model has 2 inputs"):
        list(open_dataset(tensors, TWO))
