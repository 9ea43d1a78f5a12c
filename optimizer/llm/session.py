"""A decoder with its KV cache, run token by token on ONNX Runtime (numpy only, no torch).

Guarantees: the cache stays in ONNX Runtime's own buffers between calls (each step binds the previous
step's ``present.*`` OrtValues as its ``past_key_values.*`` through IOBinding, so no numpy copy of the
cache is made); batch 1; greedy decoding takes the first of equal largest logits, so the same model and
prompt always give the same tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dlopt.core.errors import DataError, ModelError
from dlopt.core.ort_sessions import cpu_session_options
from dlopt.llm.kv import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, layout_from_graph

_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32}


def greedy(session: Any, ids: Sequence[int], max_new_tokens: int, *, eos_token_id: int | None = None) -> list[int]:
    """The greedy continuation of ``ids`` by a session with ``prefill``/``step``: up to ``max_new_tokens`` new
    token ids (fewer when ``eos_token_id`` comes, which is included)."""
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be 1 or more, not {max_new_tokens}")
    logits = session.prefill(ids)[-1]
    tokens: list[int] = []
    while True:
        tokens.append(int(np.argmax(logits)))
        if len(tokens) == max_new_tokens or tokens[-1] == eos_token_id:
            return tokens
        logits = session.step(tokens[-1])


def checked_ids(ids: Sequence[int], vocab: int | None) -> np.ndarray:
    """``ids`` as a 1-D integer array, each inside the vocabulary; DataError in one line otherwise."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"a decoder takes a non-empty sequence of token ids, not an array of shape {list(ids.shape)} "
                        f"and type {ids.dtype}")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise DataError(f"token id {bad} is outside the model's vocabulary of {vocab}")
    return ids


class DecoderSession:
    """``prefill(ids)`` the prompt, then ``step(token)`` once per new token; ``generate`` does both greedily.

    ``model`` is an ONNX file or an ``onnxruntime.InferenceSession`` of a decoder with optimum's KV-cache
    names (``dlopt.llm.kv``); its layout (layers, kv heads, head size) is read from the graph."""

    def __init__(self, model: str | os.PathLike | Any, *, threads: int = 0):
        import onnxruntime as ort

        if isinstance(model, ort.InferenceSession):
            self.session, name = model, "the session's model"
        else:
            path = Path(model)
            if not path.is_file():
                raise ModelError(f"no decoder at {path}")
            self.session = ort.InferenceSession(str(path), cpu_session_options(threads),
                                                providers=["CPUExecutionProvider"])
            name = path.name
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.layout = layout_from_graph(inputs, outputs, name)
        fed = {INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *self.layout.past_names}
        unknown = [i.name for i in inputs if i.name not in fed]
        if unknown:
            raise ModelError(f"{name} needs inputs a decoding loop does not feed: {', '.join(unknown)}")
        self._types = {i.name: _TYPES.get(i.type) for i in inputs}
        odd = sorted(n for n, t in self._types.items() if t is None)
        if odd:
            raise ModelError(f"{name}: input {odd[0]} has type {next(i.type for i in inputs if i.name == odd[0])}, "
                             "a decoder's are int64/int32 ids and float32/float16 caches")
        last = next(o.shape for o in outputs if o.name == LOGITS)[-1]
        self.vocab = last if isinstance(last, int) else None
        self._outputs = [LOGITS, *self.layout.present_names]
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
        """The greedy continuation of ``ids`` (see :func:`greedy`)."""
        return greedy(self, ids, max_new_tokens, eos_token_id=eos_token_id)

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        ids = checked_ids(ids, self.vocab)
        total = self.length + len(ids)
        feeds = {INPUT_IDS: ids[None], ATTENTION_MASK: np.ones((1, total)),
                 POSITION_IDS: np.arange(self.length, total)[None]}
        binding = self.session.io_binding()
        for name, array in feeds.items():
            if name in self._types:
                binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=self._types[name]))
        layout = self.layout
        for index, name in enumerate(layout.past_names):
            if self._past:
                binding.bind_ortvalue_input(name, self._past[index])
            else:
                binding.bind_cpu_input(name, np.zeros((1, layout.kv_heads, 0, layout.head_dim), self._types[name]))
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *self._past = binding.get_outputs()
        self.length = total
        return logits.numpy()[0]
