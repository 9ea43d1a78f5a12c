"""A decoder with its KV cache on OpenVINO: built from the ONNX export with NNCF's weight-only compression
(``build_openvino_decoder``) and run token by token on the CPU plugin (``OpenVINODecoderSession``).

Weights: ``fp32`` as exported; ``int8`` every MatMul weight, the embedding table and the head per output channel
(NNCF ``INT8_SYM``: i8 and an f16 scale per row); ``int4`` the MatMuls of the layers in groups along the input
channels (``INT4_SYM``: i4 with an f16 scale per group), while NNCF keeps the embedding Gather and the head (the
last MatMul) at its backup precision, INT8_ASYM per row (``all_layers=False``; ``all_layers=True`` puts both in
int4 groups, which OpenVINO runs).  On SmolLM2-135M (its float32 dequantised from Q4_1; GPL-3, 4096 tokens)
perplexity rose by +0.75 % with INT8_SYM against +1.24 % with INT8_ASYM, and by +25 % with int4 group 64 against
+47 % with ``all_layers=True``.  A tied head needs nothing of its own: OpenVINO's ONNX frontend folds
``Transpose(E)`` into the head MatMul's ``transpose_b``, so one constant feeds the Gather and the head, and NNCF
compresses it once for both.

Guarantees: ``build_openvino_decoder`` writes ``openvino_model.xml`` and ``openvino_model.bin`` only, after the
compressed model compiled and ran a prefill and a decode step to finite logits; a group size that does not divide
every compressed MatMul's input channels is refused before NNCF runs.  ``OpenVINODecoderSession`` runs in f32
arithmetic (the CPU plugin would otherwise pick bf16 on CPUs with AVX512-BF16 or AMX); batch 1; greedy decoding
takes the first of equal largest logits, like ``DecoderSession``.  openvino and nncf load inside the functions;
nncf loads without torch and sends no telemetry.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from dlopt.core.errors import CompileError, ConfigError, ModelError, TargetUnavailable, first_line
from dlopt.core.optional import hidden, require
from dlopt.llm.kv import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, layout_from_graph
from dlopt.llm.session import checked_ids, greedy

logger = logging.getLogger(__name__)

XML, BIN = "openvino_model.xml", "openvino_model.bin"
WEIGHTS = ("fp32", "int8", "int4")
GROUP_SIZES = (128, 64, 32)  # int4 group sizes tried, largest first, when none is given
INT8_MODE = "INT8_SYM"
_NAMES = re.compile(r"input_ids|attention_mask|position_ids|logits|(past_key_values|present)\.\d+\.(key|value)")


def _ov():
    return require("openvino", "openvino", "an OpenVINO decoder needs OpenVINO")


def properties(threads: int, dynamic_quantization: int | None = None) -> dict:
    """The CPU plugin's settings for a decoder: f32 arithmetic (not bf16 on AVX512-BF16/AMX CPUs), ``threads``
    threads, one stream, latency first; ``dynamic_quantization``: DYNAMIC_QUANTIZATION_GROUP_SIZE, the group of
    activations the plugin quantises to int8 on the fly before a MatMul with compressed weights (None: the
    plugin's default, 32 here; 0: off, activations stay f32)."""
    if threads < 1:
        raise ConfigError(f"an OpenVINO decoder runs on 1 or more threads, not {threads}")
    if dynamic_quantization is not None and dynamic_quantization < 0:
        raise ConfigError(f"dynamic_quantization is an activation group size, 0 (off) or more, not "
                          f"{dynamic_quantization}")
    settings = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY"}
    if dynamic_quantization is not None:
        settings["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = dynamic_quantization
    return settings


def weight_channels(model: Any) -> dict[str, int]:
    """Input channels of every MatMul with a constant 2-D weight in an OpenVINO model, by node name: the axis
    NNCF groups along (the reduction axis, after ``transpose_b``)."""
    channels = {}
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input(1).get_source_output().get_node()
        shape = weight.get_output_partial_shape(0)
        if weight.get_type_name() != "Constant" or not shape.is_static or len(shape) != 2:
            continue
        channels[op.get_friendly_name()] = int(shape[1 if op.get_attributes().get("transpose_b") else 0].get_length())
    return channels


def group_size_for(channels: dict[str, int], group_size: int | None = None) -> int:
    """``group_size`` when it divides every MatMul's input channels, else the largest of ``GROUP_SIZES`` that does
    (when none is given); ConfigError in one line otherwise."""
    sizes = sorted(set(channels.values()))
    if not sizes:
        raise ModelError("the decoder has no MatMul with a constant weight to compress")
    fits = [g for g in GROUP_SIZES if all(s % g == 0 for s in sizes)]
    if group_size is None:
        if not fits:
            raise ConfigError(f"no int4 group size of {', '.join(map(str, GROUP_SIZES))} divides the decoder's "
                              f"MatMul input channels {sizes}: pass group_size that divides them all")
        return fits[0]
    if group_size < 1 or any(s % group_size for s in sizes):
        hint = f"use {' or '.join(map(str, fits))}" if fits else "pass one that divides them all"
        raise ConfigError(f"int4 group size {group_size} does not divide every MatMul input size of the decoder "
                          f"({', '.join(map(str, sizes))}; the hidden size among them): {hint}")
    return group_size


def _compress(model: Any, weights: str, group_size: int | None) -> tuple[Any, str]:
    """``model`` compressed by NNCF, and a note on how."""
    from dlopt.passes.quantize_nncf import _import_nncf, _quiet

    if weights == "int4":
        group_size = group_size_for(weight_channels(model), group_size)
    elif group_size is not None:
        raise ConfigError(f"group_size is for int4 weights; {weights} weights take none")
    try:
        nncf = _import_nncf()
    except Exception as exc:  # ImportError, or a broken dependency under it
        raise TargetUnavailable(f"nncf cannot be imported ({first_line(exc)}): pip install 'dlopt[nncf]'") from exc
    if weights == "int8":
        options = {"mode": getattr(nncf.CompressWeightsMode, INT8_MODE)}  # NNCF refuses all_layers for INT8 modes
        note = f"NNCF {INT8_MODE} per channel, embedding and head included"
    else:
        options = {"mode": nncf.CompressWeightsMode.INT4_SYM, "group_size": group_size, "ratio": 1.0,
                   "all_layers": False, "backup_mode": nncf.BackupMode.INT8_ASYM}
        note = f"NNCF INT4_SYM group {group_size}; embedding and head INT8_ASYM per channel"
    try:
        with _quiet(), hidden("torch"):
            return nncf.compress_weights(model, **options), note
    except Exception as exc:
        raise CompileError(f"NNCF weight compression ({weights}) failed: {first_line(exc)}") from exc


def build_openvino_decoder(onnx_path: str | os.PathLike, folder: str | os.PathLike, *, weights: str,
                           group_size: int | None = None, threads: int = 1) -> list[str]:
    """Convert the ONNX decoder ``onnx_path`` (optimum's KV-cache names) to OpenVINO IR with ``weights``
    ("fp32", "int8" or "int4", see the module) in ``folder``; the names of the files written.

    ``group_size`` (int4 only): weights per scale along the input channels; by default the largest of 128, 64
    and 32 that divides every compressed MatMul's input channels.  ``threads``: the CPU threads of the check run."""
    if weights not in WEIGHTS:
        raise ConfigError(f"OpenVINO decoder weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    properties(threads)
    source = Path(onnx_path)
    if not source.is_file():
        raise ModelError(f"no ONNX decoder at {source}")
    ov = _ov()
    from dlopt.targets.openvino import _message, _root_logger_kept

    try:
        with _root_logger_kept():
            model = ov.convert_model(str(source))
    except Exception as exc:
        raise CompileError(f"OpenVINO could not convert {source.name}: {_message(exc)}") from exc
    _ports(model, source.name)  # a decoder with its cache, before any compression work
    note = "float32 as exported"
    if weights != "fp32":
        model, note = _compress(model, weights, group_size)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(out / XML), compress_to_fp16=False)  # the default would store f32 weights in f16
    except Exception as exc:
        raise CompileError(f"OpenVINO could not save the decoder to {out}: {_message(exc)}") from exc
    del model
    try:
        session = OpenVINODecoderSession(out, threads=threads)
        logits = [session.prefill([0, 1])[-1], session.step(2)]
    except Exception:
        for name in (XML, BIN):
            (out / name).unlink(missing_ok=True)
        raise
    if not all(np.isfinite(x).all() for x in logits):
        for name in (XML, BIN):
            (out / name).unlink(missing_ok=True)
        raise CompileError(f"the OpenVINO {weights} decoder gives non-finite logits on a 2-token prompt")
    logger.info("OpenVINO decoder in %s: %s, %.1f MB", out, note, (out / BIN).stat().st_size / 1e6)
    return [XML, BIN]


def _ports(model: Any, name: str):
    """(inputs, outputs) of an OpenVINO model as objects with ``.name`` (optimum's, when a port has it among
    its names) and ``.shape`` (ints and "?"), and the model's KV layout."""

    def described(port):
        names = sorted(port.get_names())
        chosen = next((n for n in names if _NAMES.fullmatch(n)), port.get_any_name() if names else "")
        shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return SimpleNamespace(name=chosen, shape=shape, port=port)

    inputs, outputs = [described(p) for p in model.inputs], [described(p) for p in model.outputs]
    return inputs, outputs, layout_from_graph(inputs, outputs, name)


class OpenVINODecoderSession:
    """``prefill(ids)`` the prompt, then ``step(token)`` once per new token; ``generate`` does both greedily.

    ``model`` is a folder holding ``openvino_model.xml`` (as ``build_openvino_decoder`` writes it) or an .xml
    file; ``threads`` and ``dynamic_quantization`` as in :func:`properties`.  The cache never leaves OpenVINO:
    two infer requests take turns, each reading the ``present.*`` tensors the other wrote as its
    ``past_key_values.*``, so no request ever writes outputs into memory it reads (one request gave the same
    logits on CPU in OpenVINO 2026.4, whose cache grows each step, but nothing promises it)."""

    def __init__(self, model: str | os.PathLike, *, threads: int = 1, dynamic_quantization: int | None = None):
        ov = _ov()
        path = Path(model)
        xml = path / XML if path.is_dir() else path
        if not xml.is_file():
            raise ModelError(f"no OpenVINO decoder at {xml}: build one with dlopt.llm.openvino.build_openvino_decoder")
        from dlopt.targets.openvino import _message

        core = ov.Core()
        try:
            read = core.read_model(str(xml))
        except Exception as exc:
            raise ModelError(f"OpenVINO cannot read {xml.name}: {_message(exc)}") from exc
        inputs, outputs, self.layout = _ports(read, xml.name)
        fed = {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.layout.past_names}
        unknown = [i.name for i in inputs if i.name not in fed]
        if unknown:
            raise ModelError(f"{xml.name} needs inputs a decoding loop does not feed: {', '.join(unknown)}")
        last = next(o.shape for o in outputs if o.name == LOGITS)[-1]
        self.vocab = last if isinstance(last, int) else None
        try:
            self.compiled = core.compile_model(read, "CPU", properties(threads, dynamic_quantization))
        except Exception as exc:
            raise CompileError(f"OpenVINO cannot compile {xml.name} for the CPU: {_message(exc)}") from exc
        index = {i.name: k for k, i in enumerate(inputs)}
        self._inputs = {i.name: (k, i.port.get_element_type().to_dtype()) for k, i in enumerate(inputs)}
        self._past_at = [index[n] for n in self.layout.past_names]
        out_index = {o.name: k for k, o in enumerate(outputs)}
        self._logits_at = out_index[LOGITS]
        self._present_at = [out_index[n] for n in self.layout.present_names]
        self._requests = [self.compiled.create_infer_request() for _ in range(2)]
        self._tensor = ov.Tensor
        self._turn = 0
        self._past: list = []
        self.length = 0  # tokens in the cache

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Forget the cache and run ``ids`` (the prompt) from an empty past: logits [len(ids), vocab]."""
        self._past, self.length = [], 0
        return self._run(ids)

    def step(self, token: int) -> np.ndarray:
        """Run one more token after those in the cache: its logits [vocab]."""
        return self._run([token])[0]

    def extend(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` after the tokens in the cache: logits [len(ids), vocab] (a long text, a part at a time)."""
        return self._run(ids)

    def generate(self, ids: Sequence[int], max_new_tokens: int, *, eos_token_id: int | None = None) -> list[int]:
        """The greedy continuation of ``ids`` (see :func:`dlopt.llm.session.greedy`)."""
        return greedy(self, ids, max_new_tokens, eos_token_id=eos_token_id)

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        ids = checked_ids(ids, self.vocab)
        total = self.length + len(ids)
        request = self._requests[self._turn]
        self._turn ^= 1
        feeds = {INPUT_IDS: ids[None], ATTENTION_MASK: np.ones((1, total)),
                 POSITION_IDS: np.arange(self.length, total)[None]}
        for name, array in feeds.items():
            if name in self._inputs:
                at, dtype = self._inputs[name]
                request.set_input_tensor(at, self._tensor(np.ascontiguousarray(array, dtype=dtype)))
        layout = self.layout
        for k, at in enumerate(self._past_at):
            if self._past:
                request.set_input_tensor(at, self._past[k])
            else:
                dtype = self._inputs[layout.past_names[k]][1]
                request.set_input_tensor(at, self._tensor(np.zeros((1, layout.kv_heads, 0, layout.head_dim), dtype)))
        request.infer()
        self._past = [request.get_output_tensor(at) for at in self._present_at]
        self.length = total
        return request.get_output_tensor(self._logits_at).data[0].copy()  # the request reuses its buffer
