"""dlopt.llm on a tiny random-weight Llama built from a config: the export with its KV cache against PyTorch,
greedy tokens against transformers' own generate(), perplexity against the Hugging Face recipe written out
in torch, and the one-line refusals.  One export for the whole file."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the llm extra: pip install 'dlopt[llm]'")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dlopt.core.errors import CompileError, ConfigError, DataError, ModelError  # noqa: E402
from dlopt.llm.evaluate import greedy_agreement, perplexity  # noqa: E402
from dlopt.llm.export import check_decoder, export_decoder  # noqa: E402
from dlopt.llm.kv import KVLayout  # noqa: E402
from dlopt.llm.session import DecoderSession  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256


def tiny_llama(seed: int):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=256, eos_token_id=None, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    model = tiny_llama(0)
    path = export_decoder(model, tmp_path_factory.mktemp("llm") / "decoder.onnx")
    return model, path


def torch_step(model, ids, cache=None):
    """transformers' own forward with its own cache: the reference the export is held to."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **({keyword: cache} if cache is not None else {}))
    return out.logits[0].numpy(), getattr(out, keyword)


def test_onnx_prefill_and_decode_logits_match_the_module(decoder):
    model, path = decoder
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    assert [o.name for o in session.get_outputs()] == ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS)
                                                                    for k in ("key", "value")]
    assert session.get_inputs()[3].shape[1::2] == [KV_HEADS, HEAD_DIM]
    for tensor in session.get_inputs() + session.get_outputs()[1:]:  # batch, sequence and past stay symbolic
        assert all(isinstance(tensor.shape[axis], str) for axis in ((0, 1) if tensor.name.endswith("_ids")
                                                                    or tensor.name == "attention_mask" else (0, 2)))

    prompt = [11, 200, 3, 47, 90, 128, 5]
    empty = {n: np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for n in names[3:]}
    onnx_prefill = session.run(None, {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, 7), np.int64),
                                      "position_ids": np.arange(7)[None], **empty})
    want_prefill, cache = torch_step(model, prompt)
    onnx_decode = session.run(None, {"input_ids": np.array([[77]]), "attention_mask": np.ones((1, 8), np.int64),
                                     "position_ids": np.array([[7]]), **dict(zip(names[3:], onnx_prefill[1:]))})
    want_decode, _ = torch_step(model, [77], cache)
    assert [p.shape for p in onnx_decode[1:]] == [(1, KV_HEADS, 8, HEAD_DIM)] * 2 * LAYERS
    prefill_error = float(np.abs(onnx_prefill[0][0] - want_prefill).max())
    decode_error = float(np.abs(onnx_decode[0][0] - want_decode).max())
    print(f"max abs logits error: prefill {prefill_error:.2e}, decode {decode_error:.2e}")
    assert prefill_error < 1e-5 and decode_error < 1e-5
    assert np.abs(want_decode).max() > 0.1  # logits that differ across the vocabulary, not all zero

    match = check_decoder(model, path)
    assert match.prefill < 1e-5 and match.decode < 1e-5


def test_greedy_tokens_equal_transformers_generate(decoder):
    model, path = decoder
    session = DecoderSession(path, threads=1)
    assert session.layout == KVLayout(LAYERS, KV_HEADS, HEAD_DIM) and session.vocab == VOCAB
    for prompt in ([5, 17, 99, 3], [250], [42] * 9 + [7, 100]):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                                  max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        got = session.generate(prompt, 16)
        assert got == want and len(got) == 16
        assert session.length == len(prompt) + 15  # the last token is chosen, never run
        assert session.generate(prompt, 16) == got  # deterministic, and prefill starts a fresh cache
    assert greedy_agreement([want], [got]).exact == 1


def hf_recipe_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """huggingface.co/docs/transformers/perplexity, written out: CrossEntropy on the module's own logits."""
    nll_sum, counted, prev_end = 0.0, 0, 0
    data = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - prev_end
        inputs = data[:, begin:end]
        targets = inputs.clone()
        targets[:, :-target_len] = -100
        with torch.no_grad():
            logits = model(inputs).logits[0].double()
        nll_sum += torch.nn.functional.cross_entropy(logits[:-1], targets[0, 1:], ignore_index=-100,
                                                     reduction="sum").item()
        counted += int((targets[0, 1:] != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / counted), counted


def test_perplexity_equals_the_recipe_in_torch(decoder):
    model, path = decoder
    session = DecoderSession(path, threads=1)
    ids = np.random.default_rng(0).integers(0, VOCAB, 300).tolist()
    for window, stride in ((64, 24), (50, 50), (512, 256)):
        got = perplexity(session, ids, window=window, stride=stride)
        want, count = hf_recipe_perplexity(model, ids, window, stride)
        assert got.tokens == count == len(ids) - (1 if stride < window else math.ceil(len(ids) / window))
        assert abs(got.perplexity - want) <= 1e-6 * want, (window, stride, got.perplexity, want)
    assert 150 < got.perplexity < 400  # random weights on random tokens: about the vocabulary's size
    # a window in parts (a prefill, then extends of the cache), as for a large vocabulary: the same sums
    for window, stride, tokens in ((64, 24, 16), (50, 50, 17), (128, 100, 40)):
        whole = perplexity(session, ids, window=window, stride=stride)
        parts = perplexity(session, ids, window=window, stride=stride, max_logits=tokens * VOCAB)
        assert parts.tokens == whole.tokens and abs(parts.nll - whole.nll) <= 1e-5 * whole.nll, (window, tokens)


def test_perplexity_and_agreement_arithmetic():
    ids = list(range(40))
    uniform = perplexity(lambda window: np.zeros((len(window), 50), np.float32), ids, window=16, stride=5)
    assert uniform.tokens == 39 and uniform.perplexity == pytest.approx(50.0, rel=1e-12)

    def certain(window):  # puts all its mass on the next id: perplexity 1
        logits = np.full((len(window), 50), -1e4)
        logits[np.arange(len(window)), (np.asarray(window) + 1) % 50] = 0.0
        return logits

    assert perplexity(certain, ids, window=8, stride=3).perplexity == pytest.approx(1.0, abs=1e-12)
    agreement = greedy_agreement([[1, 2, 3, 4], [5, 6], [7, 8]], [[1, 2, 9, 4], [5, 6], [7]])
    assert (agreement.prefix, agreement.exact, agreement.prompts) == (pytest.approx((0.5 + 1 + 0.5) / 3), 1, 3)
    with pytest.raises(ConfigError, match="stride between 1 and the window"):
        perplexity(certain, ids, window=8, stride=9)
    with pytest.raises(DataError, match="2 reference and 1 candidate"):
        greedy_agreement([[1], [2]], [[1]])


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_a_model_without_past_inputs_and_a_mismatching_export_are_refused(decoder, tmp_path):
    model, path = decoder
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["input_ids"], ["logits"], to=onnx.TensorProto.FLOAT)], "no_cache",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, "s"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "s"])])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), plain)
    with pytest.raises(ModelError) as refused:
        DecoderSession(plain)
    assert one_line(refused).startswith("plain.onnx has no past_key_values.* inputs: it is not a decoder exported")

    with pytest.raises(CompileError) as refused:
        check_decoder(tiny_llama(1), path)  # same architecture, other weights
    assert one_line(refused).startswith("decoder.onnx differs from the module on a prefill with an empty past: "
                                        "max abs logits error")

    with pytest.raises(ConfigError) as refused:
        export_decoder(tiny_llama(0).to(torch.bfloat16), tmp_path / "bf16.onnx")
    assert one_line(refused) == ("export_decoder needs a float32 model, this one is bfloat16: load it with "
                                 "dtype=torch.float32")
    assert not (tmp_path / "bf16.onnx").exists()
    with pytest.raises(DataError) as refused:
        DecoderSession(path).generate([3, VOCAB], 4)
    assert one_line(refused) == f"token id {VOCAB} is outside the model's vocabulary of {VOCAB}"


def test_importing_dlopt_llm_loads_neither_torch_nor_transformers():
    probe = ("import sys, dlopt.llm.export, dlopt.llm.session, dlopt.llm.evaluate, dlopt.llm.source; "
             "print(','.join(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_a_saved_model_folder_loads_back_in_float32(decoder, tmp_path):
    from dlopt.llm.source import load_causal_lm

    model, _ = decoder
    model.save_pretrained(tmp_path / "folder")
    loaded = load_causal_lm(tmp_path / "folder")
    assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training
    assert np.array_equal(torch_step(loaded, [1, 2, 3])[0], torch_step(model, [1, 2, 3])[0])
    with pytest.raises(ConfigError) as refused:
        load_causal_lm(tmp_path / "folder", gguf_file="model.gguf")
    assert one_line(refused) == f"no GGUF file model.gguf in {tmp_path / 'folder'}"
    with pytest.raises(ModelError) as refused:
        load_causal_lm(tmp_path)
    assert one_line(refused).startswith(f"cannot load a causal LM from {tmp_path}: ")


def test_weights_written_a_tensor_at_a_time_are_safetensors_transformers_reads(tmp_path):
    """prepare.save_safetensors (what a GGUF export leaves for the model builder): read back by the safetensors
    package and by transformers, a tied head written once."""
    from safetensors.numpy import load_file

    from dlopt.llm.prepare import save_safetensors
    from dlopt.llm.source import load_causal_lm

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=KV_HEADS, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = transformers.LlamaForCausalLM(config).eval()
    model.config.save_pretrained(tmp_path)
    size = save_safetensors(model, tmp_path / "model.safetensors")
    assert size == (tmp_path / "model.safetensors").stat().st_size
    tensors = load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert "lm_head.weight" not in tensors and set(tensors) == set(state) - {"lm_head.weight"}
    assert all(np.array_equal(tensors[k], state[k].numpy()) for k in tensors)
    loaded = load_causal_lm(tmp_path)
    assert np.array_equal(torch_step(loaded, [4, 5, 6])[0], torch_step(model, [4, 5, 6])[0])


def test_the_cache_layout_is_read_from_names_and_shapes():
    from types import SimpleNamespace as Tensor

    from dlopt.llm.kv import layout_from_graph

    inputs = [Tensor(name="input_ids", shape=["b", "s"])] + [
        Tensor(name=f"past_key_values.{i}.{k}", shape=["b", 3, "p", 64]) for i in range(30) for k in ("key", "value")]
    outputs = [Tensor(name="logits", shape=["b", "s", 49152])] + [
        Tensor(name=f"present.{i}.{k}", shape=["b", 3, "t", 64]) for i in range(30) for k in ("key", "value")]
    assert layout_from_graph(inputs, outputs) == KVLayout(30, 3, 64)
    with pytest.raises(ModelError) as refused:
        layout_from_graph(inputs[:-1], outputs[:-2], "m.onnx")
    assert one_line(refused).startswith("m.onnx is a KV-cache decoder without past_key_values.29.value, "
                                        "present.29.key, present.29.value: every layer needs")
    inputs[-1] = Tensor(name="past_key_values.29.value", shape=["b", 3, "p", "head"])
    with pytest.raises(ModelError, match="not all \\[batch, kv_heads, past, head_dim\\]"):
        layout_from_graph(inputs, outputs)
