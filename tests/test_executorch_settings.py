"""executorch.json is read from an output folder, so it is hostile: its input shapes size the zero padding a
batch other than the exported one gets, and a crafted shape must be refused before anything is allocated."""

from __future__ import annotations

from dlopt.targets.executorch_plain import _PTE_MAX_ELEMENTS, ExecutorchPlain


def _settings(shape):
    return {"inputs": [{"name": "x", "dtype": "float32", "shape": shape}], "threads": 2}


def test_the_shapes_dlopt_writes_are_accepted():
    assert ExecutorchPlain.refusal(_settings([1, 3, 224, 224]), repr) is None
    assert ExecutorchPlain.refusal(_settings([8, 512, 768]), repr) is None
    assert ExecutorchPlain.refusal(_settings([1] * 16), repr) is None


def test_a_shape_that_would_pad_to_a_huge_array_is_refused_in_one_line():
    for shape in ([10 ** 12, 3], [1, _PTE_MAX_ELEMENTS + 1], [65536, 65536], [1] * 17):
        why = ExecutorchPlain.refusal(_settings(shape), repr)
        assert why is not None and why.startswith("declares input 'x' of shape [") and "\n" not in why, why
        assert f"{_PTE_MAX_ELEMENTS} elements" in why
    assert ExecutorchPlain.refusal(_settings([1, _PTE_MAX_ELEMENTS]), repr) is None  # the limit itself holds


def test_malformed_entries_keep_their_own_message():
    assert "not a name, a dtype and a static shape" in ExecutorchPlain.refusal(_settings([0, 3]), repr)
    assert "not a name, a dtype and a static shape" in ExecutorchPlain.refusal(_settings(["N", 3]), repr)
