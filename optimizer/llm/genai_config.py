"""``genai_config.json``: what ONNX Runtime GenAI needs to run a dlopt decoder folder on CPU.

A folder holding a decoder with optimum's KV-cache names (``dlopt.llm.kv``), its tokenizer saved by
transformers' ``save_pretrained`` (``tokenizer.json``, ``tokenizer_config.json``) and this file runs with
``onnxruntime_genai.Model(folder)``.  Measured with onnxruntime-genai 0.18.0 on ONNX Runtime 1.32 (CPU):

- ``search.past_present_share_buffer`` must be false for a model that concatenates past and new keys (dlopt's
  export, optimum's): true makes GenAI feed a past of ``max_length`` positions that the model writes into in
  place, and such a model fails in its first Concat.  The model builder's fused graph (GroupQueryAttention)
  writes in place, and the builder's own genai_config.json sets it true for that graph.
- GenAI always has an end-of-text token: without ``eos_token_id`` it stops at token 0, and an id outside
  ``[0, vocab_size)`` (-1, say) is refused when the model loads.  It stops *without* appending that token,
  where ``DecoderSession.generate`` keeps it as the last one.
- ``model.type`` ``"decoder"`` is GenAI's architecture-neutral decoder-only model (``"llama"`` and
  ``"qwen2"`` run these names the same way; a type it does not list, ``smollm2`` say, is refused).  Its
  default input and output names are optimum's; they are written out all the same.  ``position_ids`` and
  ``attention_mask`` are fed (int64, as this export declares them).
- ``session_options.intra_op_num_threads`` sizes ONNX Runtime's pool as in an ``InferenceSession``.
- ``com.microsoft.MatMulNBits`` runs as in ONNX Runtime: INT4 with and without ``accuracy_level`` 4 gives
  the same greedy tokens as ``DecoderSession`` on the same file.

Guarantees: :func:`genai_config` is pure (json-ready dict, no imports beyond the standard library and
dlopt.core); every token id it writes lies in ``[0, vocab_size)``, else ConfigError in one line.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from pathlib import Path
from typing import Sequence

from dlopt.core.artifacts import write_file
from dlopt.core.errors import ConfigError
from dlopt.llm.kv import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS

logger = logging.getLogger(__name__)

FILE_NAME = "genai_config.json"
MODEL_TYPE = "decoder"  # GenAI's generic decoder-only LLM (src/models/model_type.h)


def genai_config(layout, *, vocab_size: int, context_length: int, bos_token_id: int | None,
                 eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, model_file: str = "model.onnx",
                 threads: int | None = None, attention_heads: int | None = None,
                 hidden_size: int | None = None, share_buffer: bool = False) -> dict:
    """The ``genai_config.json`` content for a decoder of KV ``layout`` (``dlopt.llm.kv.KVLayout``) in
    ``model_file``, greedy by default (``do_sample`` false, ``max_length`` = ``context_length``).

    ``eos_token_id``: one id or several (GenAI stops at any); required, since GenAI always stops at one.
    ``pad_token_id`` None: the first eos id (as GenAI's own builder does); ``bos_token_id`` None: left out.
    ``threads`` None or 0: ONNX Runtime's default pool; ``attention_heads``/``hidden_size``: written when
    given (GenAI's CPU decoder runs without them; its builder writes the model's).  ``share_buffer``: the
    model writes its new keys and values into the past it is given (GroupQueryAttention, as the model builder's
    graph does), so GenAI keeps one cache buffer of ``max_length`` instead of a new present per token."""
    vocab_size = _positive("vocab_size", vocab_size)
    context_length = _positive("context_length", context_length)
    if eos_token_id is None or isinstance(eos_token_id, (list, tuple)) and not eos_token_id:
        raise ConfigError("ONNX Runtime GenAI needs an eos_token_id (without one it stops at token 0): pass the "
                          "tokenizer's end-of-text id")
    several = isinstance(eos_token_id, (list, tuple))
    eos = [_token("eos_token_id", token, vocab_size) for token in (eos_token_id if several else [eos_token_id])]
    bos_token_id = _token("bos_token_id", bos_token_id, vocab_size)
    pad_token_id = _token("pad_token_id", pad_token_id, vocab_size)
    if threads is not None and (_whole(threads) is None or threads < 0):
        raise ConfigError(f"threads must be a whole number, 0 or more (0: ONNX Runtime's default), not {threads!r}")
    if not model_file or Path(model_file).name != model_file:
        raise ConfigError(f"model_file must be a file name inside the folder, not {model_file!r}")

    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}  # no provider: CPU
    if threads:
        session_options["intra_op_num_threads"] = int(threads)
    decoder: dict = {
        "session_options": session_options,
        "filename": model_file,
        "head_size": layout.head_dim,
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": LOGITS, "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        "num_hidden_layers": layout.layers,
        "num_key_value_heads": layout.kv_heads,
    }
    if attention_heads is not None:
        decoder["num_attention_heads"] = _positive("attention_heads", attention_heads)
    if hidden_size is not None:
        decoder["hidden_size"] = _positive("hidden_size", hidden_size)
    model: dict = {
        "context_length": context_length,
        "decoder": decoder,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": eos[0] if pad_token_id is None else pad_token_id,
        "type": MODEL_TYPE,
        "vocab_size": vocab_size,
    }
    if bos_token_id is not None:
        model["bos_token_id"] = bos_token_id
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context_length,
              "min_length": 0, "past_present_share_buffer": bool(share_buffer), "repetition_penalty": 1.0, "temperature": 1.0,
              "top_k": 50, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
              "diversity_penalty": 0.0}
    return {"model": model, "search": search}


def write_genai_config(folder: str | os.PathLike, layout, **options) -> Path:
    """Write :func:`genai_config` (``layout`` and ``options`` as there) to ``folder/genai_config.json``
    whole or not at all; returns its path."""
    config = genai_config(layout, **options)
    path = write_file(Path(folder) / FILE_NAME, json.dumps(config, indent=4) + "\n")
    logger.debug("wrote %s for %s", path, config["model"]["decoder"]["filename"])
    return path


def genai_snippet(folder_name: str, *, prompt: str = "Once upon a time", max_new_tokens: int = 64) -> str:
    """The Python a README shows to run ``folder_name`` with ``onnxruntime_genai``: greedy, at most
    ``max_new_tokens`` after ``prompt``, printing only the new text."""
    return (
        "import onnxruntime_genai as og\n"
        "\n"
        f"model = og.Model({str(folder_name)!r})\n"
        "tokenizer = og.Tokenizer(model)\n"
        f"prompt = tokenizer.encode({prompt!r})\n"
        "params = og.GeneratorParams(model)\n"
        f"params.set_search_options(do_sample=False, max_length=len(prompt) + {int(max_new_tokens)})\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(prompt)\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "print(tokenizer.decode(generator.get_sequence(0)[len(prompt):]))\n"
    )


def _whole(value) -> int | None:
    """``value`` as an int when it is a whole number (numpy's too), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive(name: str, value) -> int:
    number = _whole(value)
    if number is None or number < 1:
        raise ConfigError(f"{name} must be a whole number, 1 or more, not {value!r}")
    return number


def _token(name: str, value, vocab_size: int) -> int | None:
    number = _whole(value)
    if value is not None and (number is None or not 0 <= number < vocab_size):
        raise ConfigError(f"{name} {value!r} is not a token id of a vocabulary of {vocab_size}: GenAI refuses ids "
                          "outside [0, vocab_size)")
    return number
