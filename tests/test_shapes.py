"""Declared timing shapes (dlopt.core.shapes): batch, --shape, eval data, and refusals."""

import numpy as np
import pytest

from dlopt.core.errors import ConfigError
from dlopt.core.specs import InputSpec
from dlopt.core.shapes import declared_shapes, describe, feed_at, parse_shape

IMG = InputSpec("x", np.dtype("float32"), ("N", 3, "H", "W"))
TOKENS = InputSpec("ids", np.dtype("int64"), ("batch", "seq"))


def test_batch_defaults_to_one_and_follows_batch():
    fixed = InputSpec("x", np.dtype("float32"), ("N", 3, 32, 32))
    assert declared_shapes([fixed]) == {"x": (1, 3, 32, 32)}
    assert declared_shapes([fixed], batch=8) == {"x": (8, 3, 32, 32)}


def test_symbolic_non_batch_dim_without_shape_or_data_is_an_error_naming_it():
    with pytest.raises(ConfigError) as info:
        declared_shapes([IMG])
    assert str(info.value) == ("2 symbolic dims that set the size of what is timed are not fixed: pass --shape H=N "
                               "(x dim 2); --shape W=N (x dim 3), or evaluation data with --eval")
    unnamed = InputSpec("x", np.dtype("float32"), ("N", 3, None, 8))
    with pytest.raises(ConfigError, match=r"1 symbolic dim that sets .* is not fixed: pass --shape x=1x3xNx8 "
                                          r"\(x dim 2, unnamed\)"):
        declared_shapes([unnamed])


def test_a_dim_name_is_given_once_for_every_input_that_uses_it():
    """A BERT export's three inputs share ``seq``: one --shape seq=64 fixes all three; the error lists it once."""
    specs = [InputSpec(n, np.dtype("int64"), ("batch", "seq")) for n in ("input_ids", "attention_mask",
                                                                          "token_type_ids")]
    with pytest.raises(ConfigError) as info:
        declared_shapes(specs)
    assert str(info.value) == ("3 symbolic dims that set the size of what is timed are not fixed: pass --shape "
                               "seq=N (input_ids dim 1, attention_mask dim 1, token_type_ids dim 1), or evaluation "
                               "data with --eval")
    assert declared_shapes(specs, shapes={"seq": (64,)}, batch=2) == {n.name: (2, 64) for n in specs}
    # an input's own --shape wins over the dim name; a dim name takes one size; unknown names are refused
    assert declared_shapes(specs, shapes={"seq": (64,), "input_ids": (1, 8)})["input_ids"] == (1, 8)
    with pytest.raises(ConfigError, match="'seq' is a dim name; give it one size"):
        declared_shapes(specs, shapes={"seq": (1, 64)})
    with pytest.raises(ConfigError, match="its dim names: batch, seq"):
        declared_shapes(specs, shapes={"sequence": (64,)})


def test_the_batch_axis_need_not_be_first():
    """A recurrent state [2, batch, 128] takes --batch on axis 1; a scalar input has no batch axis."""
    specs = [InputSpec("input", np.dtype("float32"), ("batch", "samples")),
             InputSpec("state", np.dtype("float32"), (2, "batch", 128)),
             InputSpec("sr", np.dtype("int64"), ())]
    shapes = declared_shapes(specs, batch=3, shapes={"samples": (576,)})
    assert shapes == {"input": (3, 576), "state": (2, 3, 128), "sr": ()}
    # a feed of one sample is repeated along each input's own batch axis for the timing shape
    sample = {"input": np.ones((1, 576), np.float32), "state": np.arange(256, dtype=np.float32).reshape(2, 1, 128),
              "sr": np.array(16000)}
    feed = feed_at(shapes, sample, None, axes={"input": 0, "state": 1, "sr": None})
    assert feed["state"].shape == (2, 3, 128) and np.array_equal(feed["state"][:, 2], sample["state"][:, 0])
    assert feed["sr"].shape == () and int(feed["sr"]) == 16000


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


def test_without_a_dim_name_the_batch_axis_is_the_first_dim_that_is_not_fixed():
    """silero-vad's export names no dim: input [?, ?], state [2, ?, 128], sr []: state's batch is axis 1."""
    from dlopt.core.layout import batch_axes

    specs = [InputSpec("input", np.dtype("float32"), (None, None)),
             InputSpec("state", np.dtype("float32"), (2, None, 128)),
             InputSpec("sr", np.dtype("int64"), ()),
             InputSpec("fixed", np.dtype("float32"), (1, 3))]
    assert batch_axes(specs) == {"input": 0, "state": 1, "sr": None, "fixed": 0}
    assert declared_shapes(specs[:3], shapes={"input": (1, 576)}) == {"input": (1, 576), "state": (2, 1, 128),
                                                                      "sr": ()}
