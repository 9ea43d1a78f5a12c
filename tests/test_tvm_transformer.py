"""A BERT-like encoder exported by torch.onnx.export, built by TVM: the import works and the numbers match ORT.

TVM 0.27's Relax ONNX frontend rejects the shape arithmetic of transformer exports (Gather on a
Shape, a 0-d ConstantOfShape, masks built from Range over the sequence); the TVM backend folds it
away at the build's static shapes (``targets.tvm.static_graph``) before import.
"""

from __future__ import annotations

import collections
import io
import math
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from helpers import run_ort  # noqa: E402

from dlopt.core.profiles import resolve_target  # noqa: E402
from dlopt.targets.tvm import backend  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SEQ, VOCAB = 16, 50


class _Layer(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.ff1, self.ff2 = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

    def forward(self, x, bias):
        b, t, d = x.shape  # traced as Shape -> Gather: the shape chain TVM's frontend trips on

        def heads(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = (heads(z) for z in self.qkv(x).split(d, dim=-1))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias, dim=-1)
        x = self.ln1(x + self.out((scores @ v).transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.ff2(torch.nn.functional.gelu(self.ff1(x))))


class Encoder(torch.nn.Module):
    """Embeddings (positions sliced from a buffer, as BERT does), a [batch, 1, seq, seq] mask
    bias expanded from the shapes, two post-LayerNorm layers with GELU."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, max_len: int = 64) -> None:
        super().__init__()
        self.tok, self.pos, self.typ = (torch.nn.Embedding(VOCAB, d), torch.nn.Embedding(max_len, d),
                                        torch.nn.Embedding(2, d))
        self.ln = torch.nn.LayerNorm(d)
        self.layers = torch.nn.ModuleList(_Layer(d, heads) for _ in range(layers))
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)

    def forward(self, input_ids, attention_mask, token_type_ids):
        b, t = input_ids.shape
        x = self.ln(self.tok(input_ids) + self.pos(self.position_ids[:, :t]) + self.typ(token_type_ids))
        keep = attention_mask[:, None, None, :].expand(b, 1, t, t).to(x.dtype)
        bias = (1.0 - keep) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return x


def encoder_onnx(seed: int = 0) -> onnx.ModelProto:
    """Exported the usual way: three int64 inputs [batch, seq], output last_hidden_state."""
    torch.manual_seed(seed)
    example = (torch.randint(0, VOCAB, (2, SEQ)), torch.ones(2, SEQ, dtype=torch.long),
               torch.zeros(2, SEQ, dtype=torch.long))
    buffer = io.BytesIO()
    torch.onnx.export(Encoder().eval(), example, buffer, input_names=NAMES, output_names=["last_hidden_state"],
                      dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*NAMES, "last_hidden_state"]},
                      opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def padded_feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQ, (batch, 1))
    return {"input_ids": rng.integers(0, VOCAB, (batch, SEQ)),
            "attention_mask": (np.arange(SEQ) < lengths).astype(np.int64),
            "token_type_ids": (np.arange(SEQ) >= lengths // 2).astype(np.int64)}


SHAPES = {n: (1, SEQ) for n in NAMES}


@pytest.fixture(scope="module")
def proto() -> onnx.ModelProto:
    return encoder_onnx()


def test_the_shape_arithmetic_is_folded_before_import(proto):
    model = ir.serde.deserialize_model(proto)
    before = collections.Counter(n.op_type for n in model.graph)
    assert before["Shape"] >= 5 and before["Range"] + before["Slice"] >= 1 and before["Expand"] == 1
    static = backend.static_graph(model, backend.input_specs(model, SHAPES))
    after = collections.Counter(n.op_type for n in static.graph)
    assert not {"Shape", "Range", "Slice", "ConstantOfShape", "Concat"} & set(after)
    (expand,) = [n for n in static.graph if n.op_type == "Expand"]  # the mask's, fed by an input
    assert expand.inputs[1].const_value.numpy().tolist() == [1, 1, SEQ, SEQ]
    assert after["MatMul"] == before["MatMul"] and after["LayerNormalization"] == before["LayerNormalization"]
    assert [tuple(v.shape) for v in static.graph.inputs] == [(1, SEQ)] * 3
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "seq"]  # the caller's model is untouched


def test_tvm_build_matches_onnxruntime_on_padded_batches(proto, tmp_path):
    artifact = backend.BACKEND.compile(ir.serde.deserialize_model(proto), resolve_target("cpu"), tmp_path,
                               precision="fp32", threads=2, shapes=SHAPES)
    assert [i["shape"] for i in artifact.settings["inputs"]] == [[1, SEQ]] * 3
    session = backend.BACKEND.load(artifact)
    feeds = padded_feeds(batch=3)  # a batch-1 library, served sample by sample
    (expected,), (got,) = run_ort(proto, feeds), session.run(feeds)
    assert got.shape == expected.shape == (3, SEQ, 32)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_dlopt_compile_keeps_a_tvm_fp32_candidate(proto, tmp_path):
    import dlopt

    report = dlopt.compile(proto, target="cpu", out=tmp_path / "o", precision="fp32", runs=3, warmup=1,
                           samples=4, shapes=SHAPES, cache=False)
    (tvm,) = [c for c in report.candidates if c.backend == "tvm" and c.precision == "fp32"]
    assert tvm.status == "ok", tvm.reason
    assert tvm.fidelity.max_rel_error <= 1e-4


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)")
def test_rpi5_gets_an_aarch64_tvm_library(proto, tmp_path):
    artifact = backend.BACKEND.compile(ir.serde.deserialize_model(proto), resolve_target("rpi5"), tmp_path,
                               precision="fp32", threads=4, shapes=SHAPES)
    data = artifact.entry_path.read_bytes()
    assert artifact.settings["form"] == "aarch64 shared library (NEON)" and data[:4] == b"\x7fELF"
    assert int.from_bytes(data[18:20], "little") == 183  # EM_AARCH64
