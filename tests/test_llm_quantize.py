"""Weight-only quantisation of a decoder exported with its KV cache (UntieLmHeadPass, QuantizeWeightOnlyPass) on a
tiny random-weight Llama with tied embeddings, run token by token by dlopt.llm's DecoderSession on ONNX Runtime.

One export for the whole file.  Perplexity is measured on 400 tokens sampled from the float model itself (seeded),
so a quantised model can only lose on them in expectation (by its KL divergence from the float one); random weights
give near-uniform predictions, hence small but ordered increases: INT8 +0.003 %, INT4 +0.04 % when measured."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers", reason="the llm extra: pip install 'dlopt[llm]'")

from llm_models import LAYERS, VOCAB, tiny_llama  # noqa: E402

from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.core.model_io import load_ir  # noqa: E402
from dlopt.llm.evaluate import greedy_agreement, perplexity  # noqa: E402
from dlopt.llm.export import export_decoder  # noqa: E402
from dlopt.llm.session import DecoderSession  # noqa: E402
from dlopt.passes.quantize_weight_only import QuantizeWeightOnlyPass  # noqa: E402
from dlopt.passes.untie_lm_head import UntieLmHeadPass  # noqa: E402

LINEARS = 7 * LAYERS + 1  # q, k, v, o, gate, up, down per layer, and the head
LINEAR_WEIGHTS = LAYERS * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 64 * VOCAB
OTHER_BYTES = 4 * (VOCAB * 64 + (2 * LAYERS + 1) * 64 + 8)  # embedding table, RMS norms, rotary frequencies
WINDOW, STRIDE = 128, 64
PROMPTS = [[5, 17, 99, 3], [250, 1], [42] * 6 + [7, 100], [200, 13, 77]]


class Float:
    """The float decoder: its file, the untied model, the evaluation tokens and its own scores on them."""

    def __init__(self, folder):
        self.path = export_decoder(tiny_llama(0, tied=True), folder / "decoder.onnx")
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.untie = UntieLmHeadPass()
        self.untied = self.untie(load_ir(self.path)).model
        self.untied_bytes = ir.serde.serialize_model(self.untied).SerializeToString(deterministic=True)
        self.session = DecoderSession(self.path, threads=1)
        self.tokens = sampled(self.session, 400, seed=0)
        self.perplexity = perplexity(self.session, self.tokens, window=WINDOW, stride=STRIDE).perplexity
        self.greedy = [self.session.generate(p, 16) for p in PROMPTS]


def sampled(session: DecoderSession, count: int, *, seed: int) -> list[int]:
    """``count`` tokens drawn from the model's own next-token distributions."""
    rng = np.random.default_rng(seed)
    tokens = [1]
    logits = session.prefill(tokens)[-1]
    while len(tokens) < count:
        p = np.exp(logits.astype(np.float64) - logits.max())
        tokens.append(int(rng.choice(len(p), p=p / p.sum())))
        logits = session.step(tokens[-1])
    return tokens


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return Float(tmp_path_factory.mktemp("llm_quant"))


def session_of(model: ir.Model, path) -> DecoderSession:
    ir.save(model, path)
    return DecoderSession(path, threads=1)


def scores(fp32: Float, model: ir.Model, path):
    """(relative perplexity increase over the float model, greedy agreement with it) of ``model``."""
    session = session_of(model, path)
    increase = perplexity(session, fp32.tokens, window=WINDOW, stride=STRIDE).perplexity / fp32.perplexity - 1
    agreement = greedy_agreement(fp32.greedy, [session.generate(p, 16) for p in PROMPTS])
    print(f"{path.stem}: perplexity {100 * increase:+.4f} %, greedy agreement {agreement.prefix:.3f} "
          f"({agreement.exact}/{agreement.prompts} exact)")
    return increase, agreement


def nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op_type]


def constant_weight_matmuls(model: ir.Model) -> list[str]:
    """MatMuls reading an initializer, or a Transpose of one, as their weight."""
    found = []
    for node in nodes(model, "MatMul"):
        weight = node.inputs[1]
        source = weight.producer()
        if weight.is_initializer() or (source is not None and source.op_type == "Transpose"
                                       and source.inputs[0].is_initializer()):
            found.append(node.name)
    return found


def test_untie_gives_the_head_its_own_weight_and_keeps_the_logits(fp32, tmp_path):
    tied = load_ir(fp32.path)
    head = fp32.untied.graph.outputs[0].producer()
    table = nodes(fp32.untied, "Gather")[0].inputs[0]
    assert table.name == "model.lm_head.weight" and list(table.shape) == [VOCAB, 64]  # the Gather reads E as before
    assert head.op_type == "MatMul" and head.inputs[1].name == "model.lm_head.weight.T"
    assert head.inputs[1].is_initializer() and list(head.inputs[1].shape) == [64, VOCAB]
    assert len(nodes(tied, "Transpose")) - len(nodes(fp32.untied, "Transpose")) == 1
    assert fp32.untie.note.startswith(f"head {head.name} reads model.lm_head.weight.T [64, {VOCAB}] instead of "
                                      "Transpose(model.lm_head.weight): +0.1 MB float")

    untied = session_of(fp32.untied, tmp_path / "untied.onnx")
    prompt = fp32.tokens[:40]
    assert np.array_equal(untied.prefill(prompt), fp32.session.prefill(prompt))  # bitwise: the same numbers
    assert np.array_equal(untied.step(9), fp32.session.step(9))

    again = UntieLmHeadPass()
    assert not again(fp32.untied).modified
    assert again.note == (f"unchanged: logits is produced by MatMul {head.name}, whose weight is not a Transpose: "
                          "no tied head")


def test_a_head_reading_a_table_nothing_else_reads_is_not_tied():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["x", "wt"], ["logits"], name="head")], "untied",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(np.ones((4, 8), np.float32), "w")])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph))
    untie = UntieLmHeadPass()
    assert not untie(model).modified and len(nodes(model, "Transpose")) == 1
    assert untie.note == ("unchanged: logits is produced by MatMul head from Transpose(w), a table nothing else "
                          "reads: not tied")


def test_int8_quantises_every_constant_weight_matmul_and_keeps_perplexity(fp32, tmp_path):
    quantise = QuantizeWeightOnlyPass(bits=8, block_size=32, symmetric=True)
    result = quantise(fp32.untied)
    model = result.model
    packed = nodes(model, "MatMulNBits")
    assert result.modified and len(packed) == LINEARS
    assert {(n.attributes["bits"].as_int(), n.attributes["block_size"].as_int()) for n in packed} == {(8, 32)}
    assert all(len(n.inputs) == 3 for n in packed)  # symmetric: no zero points
    assert "accuracy_level" not in packed[0].attributes
    assert constant_weight_matmuls(model) == [] and len(nodes(model, "MatMul")) == 2 * LAYERS  # attention only
    assert len(nodes(model, "Gather")) == 1 and model.opset_imports[""] == 20  # embedding and opset as they were

    summary = quantise.summary
    assert len(summary.quantised) == LINEARS and summary.left == () and summary.gathers == ()
    assert summary.activation_matmuls == 2 * LAYERS and summary.transposes_folded == LINEARS - 1
    # a byte per weight and a float scale per block of 32; the embedding table and the norms stay float
    assert summary.bytes_before == OTHER_BYTES + 4 * LINEAR_WEIGHTS
    assert summary.bytes_after == OTHER_BYTES + LINEAR_WEIGHTS * (1 + 4 / 32)
    assert quantise.note.startswith(f"{LINEARS} MatMul(s) -> MatMulNBits INT8 block 32 sym; 4 MatMul(s) of two "
                                    "activations; initializers 0.4 MB -> 0.2 MB")

    increase, agreement = scores(fp32, model, tmp_path / "int8.onnx")
    assert abs(increase) < 2e-4  # measured +0.003 %
    assert agreement.prefix == 1.0
    # the input model and file are untouched (ORT's quantiser edits the proto it gets: a copy)
    assert ir.serde.serialize_model(fp32.untied).SerializeToString(deterministic=True) == fp32.untied_bytes
    assert hashlib.sha256(fp32.path.read_bytes()).hexdigest() == fp32.digest


def test_int4_loses_more_than_int8_but_stays_finite(fp32, tmp_path):
    int8, _ = scores(fp32, QuantizeWeightOnlyPass(bits=8)(fp32.untied).model, tmp_path / "int8.onnx")
    quantise = QuantizeWeightOnlyPass(bits=4, block_size=32)
    model = quantise(fp32.untied).model
    assert {n.attributes["bits"].as_int() for n in nodes(model, "MatMulNBits")} == {4}
    assert len(nodes(model, "MatMulNBits")) == LINEARS
    assert quantise.summary.bytes_after == OTHER_BYTES + LINEAR_WEIGHTS * (1 / 2 + 4 / 32)
    int4, _ = scores(fp32, model, tmp_path / "int4.onnx")
    assert math.isfinite(int4) and 2 * abs(int8) < int4 < 2e-3  # measured +0.036 %

    asymmetric = QuantizeWeightOnlyPass(bits=4, symmetric=False)(fp32.untied).model
    assert {len(n.inputs) for n in nodes(asymmetric, "MatMulNBits")} == {4}  # with zero points
    assert math.isfinite(scores(fp32, asymmetric, tmp_path / "int4_asym.onnx")[0])


def test_a_head_kept_float_or_tied_stays_a_matmul(fp32, tmp_path):
    quantise = QuantizeWeightOnlyPass(bits=4, head=False)
    model = quantise(fp32.untied).model
    head = model.graph.outputs[0].producer()
    assert head.op_type == "MatMul" and head.inputs[1].name == "model.lm_head.weight.T"
    assert len(nodes(model, "MatMulNBits")) == LINEARS - 1
    assert quantise.summary.left == ((head.name, "the head, kept float (head=False)"),)
    # a second pass at 8 bits quantises what the first left: an INT4 model with an INT8 head
    head8 = QuantizeWeightOnlyPass(bits=8)(model).model
    assert model.graph.outputs[0].producer().op_type == "MatMul"  # the first model is untouched
    assert head8.graph.outputs[0].producer().attributes["bits"].as_int() == 8
    assert math.isfinite(scores(fp32, head8, tmp_path / "int4_head8.onnx")[0])

    quantise = QuantizeWeightOnlyPass(bits=8)
    model = quantise(load_ir(fp32.path)).model  # not untied: the head reads Transpose(embedding table)
    head = model.graph.outputs[0].producer()
    assert head.op_type == "MatMul" and head.inputs[1].producer().op_type == "Transpose"
    why = ("weight is Transpose(model.lm_head.weight), a table Gather node_embedding also reads (tied embeddings: "
           "run UntieLmHeadPass first)")
    assert quantise.summary.left == ((head.name, why),)
    assert len(quantise.summary.quantised) == LINEARS - 1


def test_accuracy_level_4_and_a_4_bit_embedding_run(fp32, tmp_path):
    model = QuantizeWeightOnlyPass(bits=8, accuracy_level=4)(fp32.untied).model
    assert {n.attributes["accuracy_level"].as_int() for n in nodes(model, "MatMulNBits")} == {4}
    increase, agreement = scores(fp32, model, tmp_path / "int8_acc4.onnx")
    assert abs(increase) < 2e-4 and agreement.prefix == 1.0

    quantise = QuantizeWeightOnlyPass(bits=4, embedding=True)
    model = quantise(fp32.untied).model
    (gather,) = nodes(model, "GatherBlockQuantized")
    assert gather.domain == "com.microsoft" and not nodes(model, "Gather")
    assert model.opset_imports[""] == 21 and quantise.summary.gathers == ("node_embedding",)
    assert "1 Gather(s) -> GatherBlockQuantized INT4 (opset 21)" in quantise.note
    increase, _ = scores(fp32, model, tmp_path / "int4_emb4.onnx")
    assert abs(increase) < 2e-3


def test_weights_in_an_external_data_file_are_read_in(fp32, tmp_path):
    ir.save(fp32.untied, tmp_path / "external.onnx", external_data="external.onnx.data")
    loaded = ir.load(tmp_path / "external.onnx")
    assert isinstance(loaded.graph.initializers["model.lm_head.weight.T"].const_value, ir.ExternalTensor)
    want = QuantizeWeightOnlyPass(bits=4)(fp32.untied).model
    got = QuantizeWeightOnlyPass(bits=4)(loaded).model
    assert len(nodes(got, "MatMulNBits")) == LINEARS
    prompt = fp32.tokens[:20]
    assert np.array_equal(session_of(got, tmp_path / "a.onnx").prefill(prompt),
                          session_of(want, tmp_path / "b.onnx").prefill(prompt))


def test_a_4_bit_embedding_is_left_float_where_opset_21_would_change_the_model():
    """GroupNormalization's scale and bias went from per group to per channel at opset 21."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
         onnx.helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=2)], "groups",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.numpy_helper.from_array(np.ones((4, 32), np.float32), "table"),
         onnx.numpy_helper.from_array(np.ones(2, np.float32), "scale"),
         onnx.numpy_helper.from_array(np.zeros(2, np.float32), "bias")])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    quantise = QuantizeWeightOnlyPass(bits=4, embedding=True)
    out = quantise(model).model
    assert [n.op_type for n in out.graph] == ["Gather", "GroupNormalization"] and out.opset_imports[""] == 18
    assert quantise.summary.left == (("embed", "GroupNormalization changes meaning at opset 21, which "
                                               "GatherBlockQuantized needs (the model is opset 18)"),)


@pytest.mark.parametrize("options, message", [
    (dict(bits=3), "weight-only bits must be 8 or 4, not 3"),
    (dict(block_size=48), "weight-only block size must be a power of two, 16 or more (16, 32, 64, 128 ...), not 48"),
    (dict(block_size=8), "weight-only block size must be a power of two, 16 or more (16, 32, 64, 128 ...), not 8"),
    (dict(accuracy_level=2), "weight-only accuracy_level must be None (float activations) or 4 (int8 "
                             "activations), not 2"),
    (dict(bits=8, embedding=True), "the embedding Gather is quantised to 4 bits only (GatherBlockQuantized), "
                                   "not 8: use bits=4 or embedding=False"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError) as refused:
        QuantizeWeightOnlyPass(**options)
    assert str(refused.value) == message


def test_the_quantiser_is_imported_lazily_and_leaves_the_root_logger_alone():
    probe = ("import logging, sys, dlopt.passes.quantize_weight_only as q; "
             "lazy = 'onnxruntime.quantization.matmul_nbits_quantizer' not in sys.modules; q._import_quantizer(); "
             "root = logging.getLogger(); print(lazy, root.handlers, logging.getLevelName(root.level))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True [] WARNING"
