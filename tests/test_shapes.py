"""Declared timing shapes (dlopt.shapes): batch, --shape, eval data, and refusals."""

import numpy as np
import pytest

from dlopt.errors import ConfigError
from dlopt.evaluate import InputSpec
from dlopt.shapes import declared_shapes, describe, feed_at, parse_shape

IMG = InputSpec("x", np.dtype("float32"), ("N", 3, "H", "W"))
TOKENS = InputSpec("ids", np.dtype("int64"), ("batch", "seq"))


def test_batch_defaults_to_one_and_follows_batch():
    fixed = InputSpec("x", np.dtype("float32"), ("N", 3, 32, 32))
    assert declared_shapes([fixed]) == {"x": (1, 3, 32, 32)}
    assert declared_shapes([fixed], batch=8) == {"x": (8, 3, 32, 32)}


def test_symbolic_non_batch_dim_without_shape_or_data_is_an_error_naming_it():
    with pytest.raises(ConfigError) as info:
        declared_shapes([IMG])
    assert str(info.value) == ("input 'x' has symbolic dim 2 ('H') that sets the size of what is timed: pass "
                               "--shape x=1x3xNxN or evaluation data with --eval")


def test_eval_data_fixes_other_dims_per_sample_not_per_chunk():
    shapes = declared_shapes([TOKENS], sample_shapes={"ids": (64,)})
    assert shapes == {"ids": (1, 64)}  # a loader's chunk of 32 never becomes the batch


def test_declared_shape_is_checked_against_the_model():
    assert declared_shapes([IMG], shapes={"x": (1, 3, 640, 640)}) == {"x": (1, 3, 640, 640)}
    with pytest.raises(ConfigError, match="dim 1 of x: float32\\[N,3,H,W\\] is fixed at 3"):
        declared_shapes([IMG], shapes={"x": (1, 4, 640, 640)})
    with pytest.raises(ConfigError, match="has 2 dims"):
        declared_shapes([IMG], shapes={"x": (1, 3)})
    with pytest.raises(ConfigError, match="which the model does not take"):
        declared_shapes([IMG], shapes={"y": (1,)})


def test_fixed_batch_refuses_another_batch():
    with pytest.raises(ConfigError, match="fixed batch of 1; --batch 8"):
        declared_shapes([InputSpec("x", np.dtype("float32"), (1, 3, 8, 8))], batch=8)


@pytest.mark.parametrize("text", ["x", "x=", "=1x2", "x=1x", "x=ax2", "x=1x0"])
def test_parse_shape_refuses_garbage(text):
    with pytest.raises(ConfigError):
        parse_shape(text)


def test_parse_and_describe():
    assert parse_shape("input:0=1x3x224x224") == ("input:0", (1, 3, 224, 224))
    assert describe({"x": (1, 3), "m": (1, 64)}) == "x=1x3, m=1x64"


def test_feed_at_repeats_or_cuts_evaluation_samples_to_the_batch():
    sample = {"x": np.arange(6, dtype=np.float32).reshape(3, 2)}
    assert feed_at({"x": (5, 2)}, sample, None)["x"][:, 0].tolist() == [0, 2, 4, 0, 2]
    assert feed_at({"x": (1, 2)}, sample, None)["x"].tolist() == [[0, 1]]
    made = feed_at({"x": (1, 7)}, sample, lambda s: {"x": np.zeros(s["x"])})
    assert made["x"].shape == (1, 7)
