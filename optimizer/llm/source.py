"""A causal LM from a Hugging Face-style folder (config and weights) or a GGUF file in it, in float32."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlopt.core.errors import ConfigError, ModelError, first_line
from dlopt.core.optional import require


def load_causal_lm(folder: str | os.PathLike, *, gguf_file: str | None = None) -> Any:
    """The model in ``folder`` (``gguf_file``: a GGUF file's name inside it, dequantised) in float32 and eval
    mode, read from disk only (never the Hub)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no model folder at {folder}")
    if gguf_file is not None and not (folder / gguf_file).is_file():
        raise ConfigError(f"no GGUF file {gguf_file} in {folder}")
    torch = require("torch", "llm", "loading a decoder needs torch")
    transformers = require("transformers", "llm", "loading a decoder needs transformers")
    if gguf_file is not None:
        require("gguf", "llm", "reading a GGUF file needs gguf")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=gguf_file, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a causal LM from {folder}{f' ({gguf_file})' if gguf_file else ''}: "
                         f"{first_line(exc)}") from exc
    return model.eval()
