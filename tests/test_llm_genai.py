"""A dlopt decoder folder (model.onnx, tokenizer.json + tokenizer_config.json, genai_config.json) run by ONNX
Runtime GenAI: its greedy tokens equal DecoderSession's on the same file, float32 and INT4 (MatMulNBits, with
and without accuracy_level 4, weights in model.onnx.data); its tokenizer reads transformers' save_pretrained;
the README snippet runs; the traps genai_config.py names hold.  One export for the whole file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the llm extra: pip install 'dlopt[llm]'")
tokenizers = pytest.importorskip("tokenizers", reason="the llm extra: pip install 'dlopt[llm]'")
og = pytest.importorskip("onnxruntime_genai", minversion="0.18",
                         reason="ONNX Runtime GenAI 0.18+ (Python 3.11+): pip install 'onnxruntime-genai>=0.18'")

import onnx_ir as ir  # noqa: E402
from llm_models import HEAD_DIM, KV_HEADS, LAYERS, VOCAB, tiny_llama  # noqa: E402

from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.llm.export import export_decoder  # noqa: E402
from dlopt.llm.genai_config import genai_config, genai_snippet, write_genai_config  # noqa: E402
from dlopt.llm.kv import KVLayout  # noqa: E402
from dlopt.llm.session import DecoderSession  # noqa: E402
from dlopt.passes.quantize_weight_only import QuantizeWeightOnlyPass  # noqa: E402

LAYOUT = KVLayout(LAYERS, KV_HEADS, HEAD_DIM)
EOS = 255  # a token the prompts below never reach in 16 greedy tokens (every run asserts 16 came)
PROMPTS = [[5, 17, 99, 3], [250], [42] * 9 + [7, 100]]
OPTIONS = dict(vocab_size=VOCAB, context_length=256, bos_token_id=None, eos_token_id=EOS, pad_token_id=None,
               threads=1, attention_heads=4, hidden_size=64)
QUANTISED = {"int4": dict(bits=4), "int4_acc4": dict(bits=4, accuracy_level=4)}


def ascii_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's kind) of 256 ids that all decode to printable ASCII: space, newline
    and the 94 printable characters, then 160 merges of a letter or space with a letter.  Every output decodes
    exactly (GenAI's decoder and transformers' render a stray byte of a UTF-8 character differently), and
    save_pretrained writes tokenizer.json and tokenizer_config.json."""
    space, newline = chr(256 + 32), chr(256 + 10)  # how GPT-2's byte-to-character table writes them
    vocab = [space, *map(chr, range(33, 127)), newline]
    merges = [(a, b) for a in space + "etaoinshr" for b in "etaoinshrdlucmfwy"][:VOCAB - len(vocab)]
    vocab += [a + b for a, b in merges]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    assert tokenizer.get_vocab_size() == VOCAB
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def copy_folder(source, target):
    target.mkdir()
    for file in source.iterdir():
        shutil.copy(file, target / file.name)
    return target


class Folders:
    """The float32 folder and its INT4 twins, with DecoderSession's greedy tokens on each."""

    def __init__(self, root):
        self.tokenizer = ascii_tokenizer()
        self.root = root
        self.fp32 = root / "fp32"
        self.fp32.mkdir()
        export_decoder(tiny_llama(0), self.fp32 / "model.onnx")
        self.tokenizer.save_pretrained(self.fp32)
        write_genai_config(self.fp32, LAYOUT, **OPTIONS)
        float_model = ir.load(self.fp32 / "model.onnx")
        for name, options in QUANTISED.items():
            folder = root / name
            folder.mkdir()
            ir.save(QuantizeWeightOnlyPass(**options)(float_model).model, folder / "model.onnx",
                    external_data="model.onnx.data")
            self.tokenizer.save_pretrained(folder)
            write_genai_config(folder, LAYOUT, **OPTIONS)
        self.greedy = {name: [DecoderSession(root / name / "model.onnx", threads=1).generate(p, 16) for p in PROMPTS]
                       for name in ("fp32", *QUANTISED)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return Folders(tmp_path_factory.mktemp("llm_genai"))


def genai_greedy(model, prompt: list[int], new: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    sequence = [int(t) for t in generator.get_sequence(0)]
    assert sequence[:len(prompt)] == prompt
    return sequence[len(prompt):]


@pytest.mark.parametrize("name", ["fp32", *QUANTISED])
def test_genai_greedy_tokens_equal_the_decoder_session(folders, name):
    model = og.Model(str(folders.root / name))
    got = [genai_greedy(model, prompt, 16) for prompt in PROMPTS]
    print(f"{name}: {got}")
    assert got == folders.greedy[name] and [len(tokens) for tokens in got] == [16] * 3
    if name != "fp32":  # the INT4 weights change tokens: the comparison is not the float one again
        assert sum(a != b for q, f in zip(got, folders.greedy["fp32"]) for a, b in zip(q, f)) >= 8
        assert (folders.root / name / "model.onnx.data").stat().st_size > 50_000


def test_the_config_written(folders):
    config = json.loads((folders.fp32 / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert (decoder["filename"], decoder["head_size"], decoder["num_hidden_layers"], decoder["num_key_value_heads"],
            decoder["num_attention_heads"], decoder["hidden_size"]) == ("model.onnx", HEAD_DIM, LAYERS, KV_HEADS, 4, 64)
    assert decoder["session_options"] == {"log_id": "onnxruntime-genai", "provider_options": [],
                                          "intra_op_num_threads": 1}
    assert {k: config["model"][k] for k in ("type", "vocab_size", "context_length", "eos_token_id", "pad_token_id")} \
        == {"type": "decoder", "vocab_size": VOCAB, "context_length": 256, "eos_token_id": EOS, "pad_token_id": EOS}
    assert "bos_token_id" not in config["model"]
    search = config["search"]
    assert (search["do_sample"], search["num_beams"], search["max_length"], search["past_present_share_buffer"]) \
        == (False, 1, 256, False)


def test_genai_stops_at_eos_and_leaves_it_out(folders, tmp_path):
    want = folders.greedy["fp32"][1]
    eos = want[2]
    assert eos not in want[:2]
    folder = copy_folder(folders.fp32, tmp_path / "eos")
    write_genai_config(folder, LAYOUT, **{**OPTIONS, "eos_token_id": [EOS, eos]})
    assert json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"] == [EOS, eos]
    assert genai_greedy(og.Model(str(folder)), PROMPTS[1], 16) == want[:2]
    assert DecoderSession(folder / "model.onnx", threads=1).generate(PROMPTS[1], 16, eos_token_id=eos) == want[:3]


def test_a_shared_past_and_present_buffer_breaks_a_concatenating_cache(folders, tmp_path):
    folder = copy_folder(folders.fp32, tmp_path / "shared")
    config = json.loads((folder / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = True
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="Concat"):
        genai_greedy(og.Model(str(folder)), PROMPTS[0], 4)


def test_genai_reads_the_tokenizer_transformers_saved(folders):
    assert json.loads((folders.fp32 / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    tokenizer = og.Tokenizer(og.Model(str(folders.fp32)))
    text = "The rest is silence,\nsaid Hamlet 42 times."
    ids = folders.tokenizer(text).input_ids
    assert len(ids) < len(text) - 5 and [int(t) for t in tokenizer.encode(text)] == ids  # merges applied
    assert tokenizer.decode(ids) == folders.tokenizer.decode(ids) == text


def test_the_readme_snippet_runs(folders):
    snippet = genai_snippet("int4", prompt="Once upon a time", max_new_tokens=16)
    assert "og.Model('int4')" in snippet and "do_sample=False" in snippet
    out = subprocess.run([sys.executable, "-c", snippet], cwd=folders.root, capture_output=True, text=True,
                         encoding="utf-8", timeout=120, check=True).stdout
    prompt = folders.tokenizer("Once upon a time").input_ids
    new = DecoderSession(folders.root / "int4" / "model.onnx", threads=1).generate(prompt, 16, eos_token_id=EOS)
    print(f"snippet: {out!r}, DecoderSession: {new}")
    assert len(new) >= 8 and out == folders.tokenizer.decode(new[:-1] if new[-1] == EOS else new) + "\n"


@pytest.mark.parametrize("change, message", [
    (dict(eos_token_id=None), "ONNX Runtime GenAI needs an eos_token_id (without one it stops at token 0): pass "
                              "the tokenizer's end-of-text id"),
    (dict(eos_token_id=[]), "ONNX Runtime GenAI needs an eos_token_id"),
    (dict(eos_token_id=[2, VOCAB]), f"eos_token_id {VOCAB} is not a token id of a vocabulary of {VOCAB}: GenAI "
                                    "refuses ids outside [0, vocab_size)"),
    (dict(pad_token_id=-1), "pad_token_id -1 is not a token id of a vocabulary of 256"),
    (dict(bos_token_id=True), "bos_token_id True is not a token id"),
    (dict(vocab_size=0), "vocab_size must be a whole number, 1 or more, not 0"),
    (dict(threads=-2), "threads must be a whole number, 0 or more (0: ONNX Runtime's default), not -2"),
    (dict(model_file="sub/model.onnx"), "model_file must be a file name inside the folder, not 'sub/model.onnx'"),
])
def test_bad_options_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError) as refused:
        genai_config(LAYOUT, **{**OPTIONS, **change})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_defaults_and_numpy_ids():
    config = genai_config(LAYOUT, vocab_size=np.int64(VOCAB), context_length=2048, bos_token_id=np.int64(1),
                          eos_token_id=(np.int64(2), 3), pad_token_id=None, threads=0)
    assert config["model"]["eos_token_id"] == [2, 3] and config["model"]["pad_token_id"] == 2
    assert config["model"]["bos_token_id"] == 1 and config["search"]["max_length"] == 2048
    assert "intra_op_num_threads" not in config["model"]["decoder"]["session_options"]
    assert {"num_attention_heads", "hidden_size"}.isdisjoint(config["model"]["decoder"])
    json.dumps(config)  # plain ints: json-ready


def test_importing_genai_config_loads_no_runtime():
    probe = ("import sys, dlopt.llm.genai_config; print(','.join(m for m in ('torch', 'transformers', "
             "'onnxruntime', 'onnxruntime_genai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
