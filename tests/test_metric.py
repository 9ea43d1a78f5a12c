"""The budget's metric follows the outputs (dlopt.measure.budget), and real-shaped models compile without --eval."""

import json

import numpy as np
import pytest

import models
from cli import dlopt
from dlopt.measure.budget import Scorer, per_sample_cosine
from dlopt.core.errors import ConfigError
from test_inputs import bert_like


def _outs(*arrays):
    return [[a] for a in arrays]


def test_classifier_logits_use_top1_agreement_and_hidden_states_use_cosine():
    logits = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    assert Scorer(_outs(logits), []).name == "top-1 agreement"
    assert Scorer(_outs(logits), [np.arange(8) % 10]).name == "top-1 accuracy"
    hidden = np.random.default_rng(0).standard_normal((2, 16, 384)).astype(np.float32)
    scorer = Scorer(_outs(hidden), [])
    assert scorer.name == "cosine similarity (min per sample)" and scorer.original == pytest.approx(1.0)


def test_normalised_embeddings_use_cosine_but_probabilities_stay_classifiers():
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((8, 384))
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)  # sentence-transformers' Normalize
    assert Scorer(_outs(embedding.astype(np.float32)), []).name == "cosine similarity (min per sample)"
    confident = np.full((8, 10), 1e-6)
    confident[np.arange(8), np.arange(8)] = 1 - 9e-6  # softmax of a sure classifier: near one-hot, norm ~1
    assert Scorer(_outs(confident.astype(np.float32)), []).name == "top-1 agreement"
    # with labels the user says these are classes
    assert Scorer(_outs(embedding.astype(np.float32)), [np.arange(8)]).name == "top-1 accuracy"


def test_cosine_is_per_sample_and_its_minimum_drives_the_drop():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 6, 5))
    got = ref.copy()
    got[2] = -ref[2]  # one sample flipped: its cosine is -1, the others 1
    cos = per_sample_cosine(_outs(ref), _outs(got))
    assert cos.tolist() == pytest.approx([1, 1, -1, 1])
    score = Scorer(_outs(ref.astype(np.float32)), []).score(_outs(got.astype(np.float32)))
    assert score.value == pytest.approx(-1.0) and score.drop_pp == pytest.approx(200.0)
    assert score.to_dict()["mean_cosine"] == pytest.approx(0.5)


def test_rel_error_metric_grows_worse_upwards():
    ref = np.ones((2, 3), np.float32)
    scorer = Scorer(_outs(ref), [], "rel-error")
    assert scorer.name == "max relative error" and scorer.original == 0.0
    assert scorer.score(_outs(ref * 1.02)).drop_pp == pytest.approx(2.0, rel=1e-4)


def test_metric_from_module_function_and_bad_specs(tmp_path, monkeypatch):
    ref = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    (tmp_path / "mymetric.py").write_text("def share_positive(outputs, labels):\n"
                                          "    return float(sum((o > 0).mean() for o in outputs) / len(outputs))\n"
                                          "def broken(outputs, labels):\n    raise ValueError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = Scorer(_outs(ref), [], "mymetric:share_positive")
    assert scorer.name == "share_positive" and scorer.original == pytest.approx(float((ref > 0).mean()))
    with pytest.raises(ConfigError, match="metric broken failed: boom"):
        Scorer(_outs(ref), [], "mymetric:broken")
    with pytest.raises(ConfigError, match="--metric takes top1, cosine, rel-error or module:function"):
        Scorer(_outs(ref), [], "accuracy")
    with pytest.raises(ConfigError, match="cannot load metric nosuchmodule:f"):
        Scorer(_outs(ref), [], "nosuchmodule:f")
    with pytest.raises(ConfigError, match="top1 needs classifier outputs"):
        Scorer(_outs(np.ones((2, 3, 4), np.float32)), [], "top1")


def test_bert_like_model_compiles_without_eval_and_is_scored_by_cosine(tmp_path):
    models.save(bert_like(), tmp_path / "bert.onnx")
    shape = ("--shape", "input_ids=1x16", "--shape", "token_type_ids=1x16", "--shape", "attention_mask=1x16")
    result = dlopt("compile", "bert.onnx", "-o", "out", "--precision", "fp32", "--runs", "5", "--warmup", "1", *shape,
                   "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["budget"]["metric"] == "cosine similarity (min per sample)"
    assert report["timing"]["shape"] == "input_ids=1x16, token_type_ids=1x16, attention_mask=1x16"
    assert report["chosen"] and report["summary"].startswith(f"chosen {report['chosen']}")


def test_symbolic_sequence_without_shape_is_refused_naming_it(tmp_path):
    models.save(bert_like(), tmp_path / "bert.onnx")
    result = dlopt("compile", "bert.onnx", "-o", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("dlopt: error: 3 symbolic dims that set the size of what is timed are not fixed: "
                                     "pass --shape seq=N (input_ids dim 1, token_type_ids dim 1, attention_mask dim 1), "
                                     "or evaluation data with --eval")
    # one flag fixes all three; the shapes are dlopt's to fix, whichever backend builds: ONNX Runtime alone
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    result = dlopt("compile", "bert.onnx", "-o", "out", "--shape", "seq=16", "--precision", "fp32", "--runs", "5",
                   "--warmup", "1", "--target", "here", "--targets-file", "t.toml", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timing"]["shape"] == "input_ids=1x16, token_type_ids=1x16, attention_mask=1x16"
