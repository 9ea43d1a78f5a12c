"""Masked scoring: per-token outputs are compared on the tokens the attention mask keeps."""

import json

import numpy as np
import pytest

from dlopt.measure.budget import Scorer, find_mask_input, per_sample_cosine
from dlopt.core.errors import ConfigError
from dlopt.core.specs import InputSpec
from tests.cli import dlopt
from tests.masked import padded_tokens, token_encoder

IDS = InputSpec("input_ids", np.dtype("int64"), ("batch", "seq"))
MASK = InputSpec("attention_mask", np.dtype("int64"), ("batch", "seq"))
TYPES = InputSpec("token_type_ids", np.dtype("int64"), ("batch", "seq"))


def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = padded_tokens(8, 16)
    hidden = rng.standard_normal((8, 16, 12)).astype(np.float32)
    garbage = hidden.copy()
    garbage[mask == 0] = rng.standard_normal(((mask == 0).sum(), 12))  # padding differs, real tokens do not
    pooled = hidden.mean(axis=1)
    return ids, mask, hidden, garbage, pooled


def test_padding_never_decides_a_per_token_score():
    ids, mask, hidden, garbage, pooled = _outputs()
    reference, candidate = [[hidden, pooled]], [[garbage, pooled]]
    unmasked = per_sample_cosine(reference, candidate)
    masked = per_sample_cosine(reference, candidate, [mask])
    assert unmasked[:8].min() < 0.7  # padding scored as output: 65%-padded samples look broken
    assert masked.min() == pytest.approx(1.0, abs=1e-6)
    scorer = Scorer(reference, [], masks=[mask], mask_name="attention_mask")
    assert scorer.name == "cosine similarity (min per sample, over unmasked tokens (attention_mask))"
    assert scorer.score(candidate).drop_pp == pytest.approx(0.0, abs=1e-4)
    assert Scorer(reference, []).score(candidate).drop_pp > 30
    # a real token that changes still counts
    broken = garbage.copy()
    broken[0, 0] = -hidden[0, 0]
    assert scorer.score([[broken, pooled]]).drop_pp > 1
    # pooled outputs alone have nothing to mask: scored as before
    pooled_only = Scorer([[pooled]], [], "cosine", masks=[mask], mask_name="attention_mask")
    assert pooled_only.name == "cosine similarity (min per sample)" and pooled_only.masks is None


def test_the_mask_input_is_detected_by_name_and_values_or_named():
    ids, mask, *_ = _outputs()
    feeds = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}]
    assert find_mask_input([IDS, MASK, TYPES], feeds, None) == "attention_mask"
    assert find_mask_input([IDS, MASK, TYPES], feeds, False) is None
    assert find_mask_input([IDS, MASK, TYPES], feeds, "token_type_ids") == "token_type_ids"
    not_binary = [{"input_ids": ids, "attention_mask": mask * 2, "token_type_ids": ids}]
    assert find_mask_input([IDS, MASK, TYPES], not_binary, None) is None
    with pytest.raises(ConfigError, match="the model has no input 'mask'"):
        find_mask_input([IDS, MASK], feeds, "mask")
    with pytest.raises(ConfigError, match=r"a mask is an integer or boolean input \[batch, seq\]"):
        find_mask_input([InputSpec("x", np.dtype("float32"), ("batch", "seq")), MASK], feeds, "x")


def test_compile_scores_token_outputs_on_unmasked_tokens_and_says_so(tmp_path):
    path = token_encoder(tmp_path / "encoder.onnx")
    ids, mask = padded_tokens(48, 24)
    np.savez(tmp_path / "eval.npz", input_ids=ids, attention_mask=mask)
    # ONNX Runtime's int8 alone: the score asserted is its row, and the masking is dlopt's, whichever backend built
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["int8"]\n')
    here = ("--target", "here", "--targets-file", tmp_path / "t.toml")
    scores = {}
    for name, extra in (("masked", []), ("unmasked", ["--no-mask"])):
        result = dlopt("compile", path, "-o", tmp_path / name, "--eval", tmp_path / "eval.npz", "--precision", "int8",
                       *here, "--runs", "5", "--warmup", "1", "--json", *extra)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        int8 = next(c for c in report["candidates"] if c["backend"] == "ort" and c["precision"] == "int8")
        scores[name] = int8["score"]
    assert scores["masked"]["metric"] == "cosine similarity (min per sample, over unmasked tokens (attention_mask))"
    assert scores["unmasked"]["metric"] == "cosine similarity (min per sample)"
    # the same artefact scores better once padding (79% of positions here) is left out
    assert scores["masked"]["value"] > scores["unmasked"]["value"]
    result = dlopt("compile", path, "-o", tmp_path / "bad", "--mask-input", "attention_mask", "--no-mask")
    assert result.returncode == 2 and "contradict" in result.stderr
