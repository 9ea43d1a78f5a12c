"""The fused float32 decoder: ONNX Runtime GenAI's model builder writes a Hugging Face model folder as one graph
with ONNX Runtime's fused operators (GroupQueryAttention with the rotary embedding inside, SkipSimplified-
LayerNormalization, one MatMul for q, k and v), and dlopt quantises that graph as it quantises its own export.

Why: the weight-only kernels are the same either way, but the fused graph runs the attention, rotary and norms
as a few kernels instead of dozens of small ones per layer; that is what made the builder's own INT4 decode
faster than an INT4 of the plain export (SmolLM2-135M, 1 thread: 85.7 vs 66.5 tokens/s).  The builder's own
quantisation choices are not used: its asymmetric INT4 with an INT8 head wrote an invalid model (ORT GenAI 0.18),
and its default (symmetric, head INT4) is the +33 % perplexity row.

Guarantees: the builder runs in its own process (``python -m onnxruntime_genai.models.builder``, offline, no
remote code, a deadline) from ``hf_folder`` into a scratch folder beside ``folder``; ``folder`` ends holding
``model.onnx`` and ``model.onnx.data`` only, with its cache inputs and outputs given the decoder's fixed KV head
size (the builder leaves it symbolic, ``kv_cache_dim``), or nothing and a CompileError in one line.  The graph's
inputs and outputs are checked to be a KV-cache decoder a decoding loop can feed, and, given the plain export,
its logits to match the export's over a prefill and decode steps (within 1e-4 of the largest logit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dlopt.core.errors import CompileError, first_line
from dlopt.llm.child import child_main

FILES = ("model.onnx", "model.onnx.data")
DEADLINE_S = 1800.0  # the builder reads and writes the weights once: minutes for a 1B model on 2 cores


def build_fused(hf_folder: Path, folder: Path, *, kv_heads: int, head_dim: int, reference: str | None = None) -> dict:
    """Run the builder on ``hf_folder`` and leave its fp32 graph in the empty ``folder`` (see the guarantees);
    with ``reference`` (the plain export's ONNX file), only a graph whose logits match it (:func:`check_same`)."""
    from dlopt.core.optional import require

    require("onnxruntime_genai", "llm", "the fused decoder is written by onnxruntime-genai's model builder")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="builder-", dir=folder.parent) as scratch:
        out, cache = Path(scratch) / "out", Path(scratch) / "cache"
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                   "-p", "fp32", "-e", "cpu", "-c", str(cache), "--extra_options", "hf_remote=false",
                   "filename=model.onnx"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=DEADLINE_S)
        except subprocess.TimeoutExpired as exc:
            raise CompileError(f"the model builder ran past its {DEADLINE_S:.0f} s deadline") from exc
        if done.returncode != 0:
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            last = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
            raise CompileError(f"the model builder failed (exit {done.returncode}): {last.strip()[:300]}")
        if not (out / "model.onnx").is_file() or not (out / "model.onnx.data").is_file():
            raise CompileError("the model builder wrote no model.onnx with model.onnx.data (its weights file)")
        _fix_cache_shapes(out / "model.onnx", kv_heads=kv_heads, head_dim=head_dim)
        note = ("ONNX Runtime GenAI's model builder: fused attention (GroupQueryAttention with rotary), "
                "SkipSimplifiedLayerNormalization, q/k/v in one MatMul")
        if reference is not None:
            error = check_same(Path(reference), out / "model.onnx")
            note += f"; logits within {error:.1e} of the export's (of their largest)"
        for name in FILES:
            shutil.move(str(out / name), str(folder / name))
    return {"files": list(FILES), "note": note}


TOLERANCE = 1e-4  # of the largest logit: SmolLM2-135M's fused graph is within 2.4e-6 of its export


def check_same(reference: Path, fused: Path, *, tokens: int = 40, prefill: int = 32) -> float:
    """The largest logit difference between the two decoders over a prefill of ``prefill`` seeded token ids and
    ``tokens - prefill`` decode steps, relative to the reference's largest logit; CompileError when it passes
    TOLERANCE (a builder that misread the model's config writes a graph that runs and computes something else)."""
    import numpy as np

    from dlopt.llm.session import DecoderSession

    logits = []
    for path in (reference, fused):
        session = DecoderSession(path, threads=1)
        ids = np.random.default_rng(0).integers(0, session.vocab or 256, tokens).tolist()
        logits.append(np.concatenate([session.prefill(ids[:prefill]),
                                      np.stack([session.step(t) for t in ids[prefill:]])]))
        del session
    want, got = logits
    error = float(np.abs(want - got).max() / max(float(np.abs(want).max()), 1e-30))
    if not error <= TOLERANCE:
        raise CompileError(f"the builder's graph does not compute the exported model: its logits differ by {error:.1e} "
                           f"of the largest (allowed {TOLERANCE:.0e})")
    return error


def _fix_cache_shapes(path: Path, *, kv_heads: int, head_dim: int) -> None:
    """Give the cache inputs and outputs their head size, and check the graph is a decoder with a KV cache of
    ``kv_heads`` heads of ``head_dim``, as the plain export's."""
    import onnx

    from dlopt.llm.kv import layout_from_proto

    proto = onnx.load(str(path), load_external_data=False)
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].HasField("dim_value"):
                dims[3].dim_value = head_dim

    try:
        layout = layout_from_proto(proto, "the builder's graph")
    except Exception as exc:
        raise CompileError(first_line(exc)) from exc
    if (layout.kv_heads, layout.head_dim) != (kv_heads, head_dim):
        raise CompileError(f"the builder's graph has a cache of {layout.kv_heads} heads of {layout.head_dim}, the "
                           f"export's {kv_heads} of {head_dim}")
    fed = {"input_ids", "attention_mask", "position_ids", *layout.past_names}
    odd = [v.name for v in proto.graph.input if v.name not in fed]
    if odd:
        raise CompileError(f"the builder's graph needs inputs a decoding loop does not feed: {', '.join(odd)}")
    onnx.save(proto, str(path))


def _main(argv: list[str]) -> int:
    return child_main(lambda a: build_fused(Path(a[0]), Path(a[1]), **json.loads(a[2])), argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
