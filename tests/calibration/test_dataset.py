"""The CalibrationDataset contract, on the smallest possible source."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlopt.calibration import CalibrationDataset
from dlopt.calibration.dataset import expected, fixed_batch
from dlopt.core.errors import DataError
from dlopt.core.specs import InputSpec

F32 = np.dtype(np.float32)


class Counting(CalibrationDataset):
    """Chunks of 3 samples numbered 0.. ; records how many chunks were pulled."""

    def __init__(self, specs, chunks, **options):
        super().__init__(specs, where="counting", **options)
        self.chunks, self.pulled = chunks, 0

    def _chunks(self):
        for i in range(self.chunks):
            self.pulled += 1
            yield {"x": np.arange(3 * i, 3 * i + 3, dtype=np.float32)[:, None]}, np.arange(3 * i, 3 * i + 3)


def test_batches_limit_and_labels_stay_in_step():
    data = Counting([InputSpec("x", F32, ("N", 1))], 5, batch_size=4, limit=10)
    pairs = list(data.iter_with_labels())
    assert [f["x"][:, 0].tolist() for f, _ in pairs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [lab.tolist() for _, lab in pairs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert data.pulled == 4  # the 5th chunk was never asked for
    assert (data.samples, len(data), data.has_labels) == (10, 3, True)


def test_fixed_batch_needs_agreement_and_a_positive_size():
    assert fixed_batch([InputSpec("a", F32, (4, 2)), InputSpec("b", F32, ("N",))]) == 4
    assert fixed_batch([InputSpec("a", F32, (4, 2)), InputSpec("b", F32, (2,))]) is None
    assert fixed_batch([InputSpec("a", F32, (0, 2)), InputSpec("b", F32, ())]) is None
    assert expected([InputSpec("a", F32, (4, None))]) == "; the model expects a: float32[4,?]"


def test_empty_source():
    with pytest.raises(DataError, match=r"^counting holds no samples; the model expects x: float32\[N,1\]$"):
        list(Counting([InputSpec("x", F32, ("N", 1))], 0))


def test_unknown_shape_checks_names_and_dtype_only():
    data = Counting([InputSpec("x", F32, ())], 1)
    assert [f["x"].shape for f in data] == [(3, 1)]


def test_importing_the_package_pulls_in_no_heavy_module():
    probe = ("import sys, dlopt.calibration; "
             "print(','.join(m for m in ('torch', 'onnx', 'onnxruntime', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


class Chunked(CalibrationDataset):
    def __init__(self, sizes, **options):
        super().__init__([InputSpec("x", F32, ("N",))], where="chunked", **options)
        self.sizes = sizes

    def _chunks(self):
        start = 0
        for size in self.sizes:
            yield {"x": np.arange(start, start + size, dtype=np.float32)}, None
            start += size


@given(sizes=st.lists(st.integers(0, 7), min_size=1, max_size=12), batch=st.integers(1, 5),
       limit=st.none() | st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_rebatching_preserves_order_and_sizes(sizes, batch, limit):
    total = sum(sizes) if limit is None else min(sum(sizes), limit)
    data = Chunked(sizes, batch_size=batch, limit=limit)
    if total == 0:
        with pytest.raises(DataError, match="holds no samples"):
            list(data)
        return
    batches = [feed["x"] for feed in data]
    assert np.concatenate(batches).tolist() == list(range(total))
    assert [len(b) for b in batches] == [batch] * (total // batch) + ([total % batch] if total % batch else [])
