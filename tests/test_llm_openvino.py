"""dlopt.llm.openvino on a tiny random-weight Llama with tied embeddings (as SmolLM2): the OpenVINO fp32 decoder
against ONNX Runtime's DecoderSession on the same export, NNCF's int8 and int4 weights judged by perplexity and
counted in the IR, and the one-line refusals.  One export for the whole file.

Perplexity is measured on tokens sampled from the float model itself (seeded, test_llm_quantize's ``sampled``),
weights drawn at standard deviation 0.1 (five times transformers' default) so that the quantisation errors show;
measured on 300 tokens (perplexity 204): fp32 the ORT figure to 1e-6, int8 +0.003 %, int4 +3.8 % (on the fp32 model's
own samples the quantised models lose only in expectation, so a small change either way is noise)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the llm extra: pip install 'dlopt[llm]'")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from llm_models import HEAD_DIM, KV_HEADS, LAYERS, VOCAB, tiny_llama  # noqa: E402
from test_llm_decoder import one_line  # noqa: E402
from test_llm_quantize import sampled  # noqa: E402

from dlopt.core.errors import ConfigError, ModelError  # noqa: E402
from dlopt.llm.evaluate import perplexity  # noqa: E402
from dlopt.llm.export import export_decoder  # noqa: E402
from dlopt.llm.kv import KVLayout  # noqa: E402
from dlopt.llm.openvino import BIN, XML, OpenVINODecoderSession, build_openvino_decoder  # noqa: E402
from dlopt.llm.session import DecoderSession  # noqa: E402

LINEARS = 7 * LAYERS  # q, k, v, o, gate, up, down per layer; the head reads the embedding table
PROMPTS = [[5, 17, 99, 3], [250, 1], [42] * 6 + [7, 100]]
WINDOW, STRIDE = 128, 64


class Float:
    def __init__(self, folder):
        self.folder = folder
        self.onnx = export_decoder(tiny_llama(0, tied=True, init_range=0.1), folder / "decoder.onnx")
        self.ort = DecoderSession(self.onnx, threads=1)
        self.tokens = sampled(self.ort, 300, seed=0)
        self.perplexity = perplexity(self.ort, self.tokens, window=WINDOW, stride=STRIDE).perplexity
        self.built: dict[str, OpenVINODecoderSession] = {}

    def session(self, weights: str) -> OpenVINODecoderSession:
        if weights not in self.built:
            out = self.folder / weights
            assert build_openvino_decoder(self.onnx, out, weights=weights) == [XML, BIN]
            assert sorted(p.name for p in out.iterdir()) == sorted([XML, BIN])
            self.built[weights] = OpenVINODecoderSession(out, threads=1)
        return self.built[weights]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return Float(tmp_path_factory.mktemp("llm_ov"))


def constants(xml_path) -> Counter:
    """(element type, rank) -> how many Const layers of the IR have it."""
    layers = ET.parse(xml_path).getroot().find("layers")
    return Counter((data.get("element_type"), len(data.get("shape").split(",")) if data.get("shape") else 0)
                   for layer in layers if layer.get("type") == "Const" for data in [layer.find("data")])


def test_fp32_decoder_matches_onnx_runtime_and_its_greedy_tokens(fp32):
    session, ort = fp32.session("fp32"), fp32.ort
    assert session.layout == KVLayout(LAYERS, KV_HEADS, HEAD_DIM) and session.vocab == VOCAB
    prompt = [11, 200, 3, 47, 90, 128, 5]
    got, want = session.prefill(prompt), ort.prefill(prompt)
    assert got.shape == want.shape == (len(prompt), VOCAB)
    errors = [float(np.abs(got - want).max())]
    for token in (77, 3, 250, 0):
        errors.append(float(np.abs(session.step(token) - ort.step(token)).max()))
    print(f"max abs logits error: prefill {errors[0]:.1e}, decode {max(errors[1:]):.1e}")  # measured 2e-7
    assert max(errors) < 1e-4 and np.abs(want).max() > 0.5
    assert session.length == len(prompt) + 4
    for prompt in PROMPTS:
        tokens = session.generate(prompt, 16)
        assert tokens == ort.generate(prompt, 16) and len(tokens) == 16
        assert session.length == len(prompt) + 15
        assert session.generate(prompt, 16) == tokens  # prefill starts a fresh cache
    assert perplexity(session, fp32.tokens, window=WINDOW, stride=STRIDE).perplexity == pytest.approx(
        fp32.perplexity, rel=1e-5)
    eos = tokens[2]
    assert session.generate(PROMPTS[-1], 16, eos_token_id=eos) == tokens[:tokens.index(eos) + 1]
    assert constants(fp32.folder / "fp32" / XML)[("f32", 2)] >= LINEARS + 1  # weights stay float32, not f16


def test_int8_and_int4_weights_keep_perplexity_and_are_stored_compressed(fp32):
    increases = {}
    for weights in ("int8", "int4"):
        session = fp32.session(weights)
        got = perplexity(session, fp32.tokens, window=WINDOW, stride=STRIDE).perplexity
        increases[weights] = got / fp32.perplexity - 1
    print(f"perplexity {fp32.perplexity:.3f}; increase int8 {increases['int8']:+.3%}, int4 {increases['int4']:+.3%}")
    assert abs(increases["int8"]) < 0.005 and abs(increases["int4"]) < 0.08
    assert abs(increases["int8"]) < abs(increases["int4"])

    int8, int4 = constants(fp32.folder / "int8" / XML), constants(fp32.folder / "int4" / XML)
    # int8: every linear and the one tied table (read by the Gather and the head), i8 with an f16 scale per row
    assert int8[("i8", 2)] == int8[("f16", 2)] == LINEARS + 1
    assert not any(kind in int8 for kind in (("i4", 3), ("u4", 3), ("u8", 2)))
    # int4: the linears in groups of 64 (i4 [out, 1, 64], symmetric: no zero point), the table kept u8 per row
    assert int4[("i4", 3)] == LINEARS and int4[("u4", 3)] == 0
    assert int4[("u8", 2)] == 2 and int4[("f16", 3)] == LINEARS and int4[("f16", 2)] == 1
    exact = OpenVINODecoderSession(fp32.folder / "int8", dynamic_quantization=0)  # activations left in f32
    assert exact.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
    prompt = PROMPTS[0]
    errors = [float(np.abs(s.prefill(prompt) - fp32.ort.prefill(prompt)).max()) for s in (exact, fp32.session("int8"))]
    print(f"int8 logits error: {errors[0]:.1e} activations f32, {errors[1]:.1e} int8 on the fly")
    assert errors[0] < errors[1] < 0.15  # measured 5.5e-2 and 7.0e-2
    sizes = {w: (fp32.folder / w / BIN).stat().st_size for w in ("fp32", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] / 3


def test_bad_weights_and_group_sizes_are_refused_in_one_line(fp32, tmp_path):
    with pytest.raises(ConfigError) as refused:
        build_openvino_decoder(fp32.onnx, tmp_path / "g48", weights="int4", group_size=48)
    assert one_line(refused) == ("int4 group size 48 does not divide every MatMul input size of the decoder "
                                 "(64, 128; the hidden size among them): use 64 or 32")
    assert not (tmp_path / "g48").exists()
    with pytest.raises(ConfigError) as refused:
        build_openvino_decoder(fp32.onnx, tmp_path / "x", weights="int3")
    assert one_line(refused) == "OpenVINO decoder weights 'int3': choose one of fp32, int8, int4"
    with pytest.raises(ConfigError) as refused:
        build_openvino_decoder(fp32.onnx, tmp_path / "x", weights="int8", group_size=64)
    assert one_line(refused) == "group_size is for int4 weights; int8 weights take none"
    with pytest.raises(ModelError) as refused:
        OpenVINODecoderSession(tmp_path)
    assert one_line(refused).startswith(f"no OpenVINO decoder at {tmp_path / XML}: build one with")


def test_openvino_and_nncf_load_only_when_used_and_never_torch(fp32, tmp_path):
    probe = ("import sys; import dlopt.llm.openvino as m; print(sorted(k for k in ('openvino', 'nncf', 'torch') "
             f"if k in sys.modules)); m.build_openvino_decoder({str(fp32.onnx)!r}, {str(tmp_path)!r}, weights='int8'); "
             "print(sorted(k for k in ('openvino', 'nncf', 'torch') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "['nncf', 'openvino']"]
