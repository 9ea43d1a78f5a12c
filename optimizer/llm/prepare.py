"""What a text-generation compile starts from: a float32 decoder with its KV cache on disk, and the tokenizer.

``MODEL`` may be an ONNX decoder (optimum's ``text-generation-with-past`` export, or dlopt's), a folder holding
one (``model.onnx`` beside ``tokenizer.json``, as optimum writes it), or a Hugging Face-style model folder
(``config.json`` with ``*.safetensors``, or one ``*.gguf`` file) that dlopt exports itself.

Guarantees: the export runs in a child process (``python -m dlopt.llm.prepare``: torch, transformers and the
float32 module never enter the compile's own memory) and writes only inside ``work``; files a folder names are
plain files inside it; ``pytorch_model.bin`` (a pickle) is never read; nothing is fetched from a hub.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dlopt.core.artifacts import read_folder_json
from dlopt.core.errors import ConfigError, ModelError, first_line
from dlopt.llm.child import child_main, run_child

logger = logging.getLogger(__name__)

# What a decoder's folder carries besides the model: copied into the output as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "config.json", "chat_template.jinja")
ONNX_NAMES = ("model.onnx", "decoder_model_merged.onnx")
HF_COPY = "hf"  # beside an export from GGUF: its float32 weights as safetensors, with config.json
_TEXT_FILE_LIMIT = 64 << 20  # a tokenizer.json of a 256k vocabulary is ~20 MB


@dataclass(frozen=True)
class DecoderSource:
    """The float32 decoder (``onnx``), the folder whose tokenizer and config files go with it, and how it came."""

    onnx: Path
    meta: Path
    exported_from: str | None  # "folder" or "gguf": dlopt exported it; None: the user's ONNX
    export_s: float = 0.0
    export_peak_rss_mb: float | None = None
    hf_folder: Path | None = None  # config.json with *.safetensors: what the model builder reads (dlopt.llm.fused)

    @property
    def meta_files(self) -> list[Path]:
        return [self.meta / name for name in TOKENIZER_FILES if _plain(self.meta / name)]


def _plain(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size <= _TEXT_FILE_LIMIT


def resolve(model: Path, work: Path) -> DecoderSource:
    """The decoder ``model`` names, exported into ``work`` first when it is a model folder."""
    model = Path(model)
    if model.is_file():
        if model.suffix != ".onnx":
            raise ConfigError(f"{model} is neither an .onnx decoder nor a model folder: --task text-generation takes "
                              "an ONNX decoder with its KV cache, or a folder with config.json and *.safetensors "
                              "or one *.gguf")
        return DecoderSource(model, model.parent, None)
    if not model.is_dir():
        raise ConfigError(f"no model at {model}")
    onnx = next((model / n for n in ONNX_NAMES if (model / n).is_file()), None)
    if onnx is not None:
        return DecoderSource(onnx, model, None)
    ggufs = sorted(p.name for p in model.glob("*.gguf") if p.is_file() and not p.is_symlink())
    if len(ggufs) > 1:
        raise ConfigError(f"{model} holds {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}): keep one in the folder")
    safetensors = any(model.glob("*.safetensors"))
    if not ggufs and not (safetensors and _plain(model / "config.json")):
        pickled = " (pytorch_model.bin is a pickle, which dlopt never loads: save it with safetensors)" \
            if (model / "pytorch_model.bin").exists() else ""
        raise ConfigError(f"{model} holds no decoder dlopt can read: model.onnx, config.json with *.safetensors, "
                          f"or one *.gguf{pickled}")
    return export_in_child(model, ggufs[0] if ggufs else None, work)


def export_in_child(folder: Path, gguf: str | None, work: Path) -> DecoderSource:
    """Export ``folder`` (its ``gguf`` file, if given) to ``work/model.onnx`` with its tokenizer, in a child."""
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    what = f"{folder}{f' ({gguf})' if gguf else ''}"
    logger.info("exporting %s to ONNX with its KV cache", what)
    result = run_child("dlopt.llm.prepare", [str(folder), gguf or "", str(work)], f"exporting {what}")
    return DecoderSource(work / "model.onnx", work, "gguf" if gguf else "folder", time.monotonic() - start,
                         result.get("peak_rss_mb"), work / HF_COPY if gguf else folder)


def model_config(meta: Path) -> dict:
    """config.json of the decoder's folder (an empty dict when there is none)."""
    config = read_folder_json(meta, "config.json", missing_ok=True) if _plain(meta / "config.json") else None
    return config if isinstance(config, dict) else {}


def special_ids(meta: Path, tokenizer) -> dict[str, int | None]:
    """bos, eos and pad token ids: generation_config.json, then config.json, then the tokenizer's own tokens."""
    found: dict[str, int | None] = {}
    sources = [read_folder_json(meta, n, missing_ok=True) if _plain(meta / n) else None
               for n in ("generation_config.json", "config.json")]
    tokens = read_folder_json(meta, "tokenizer_config.json", missing_ok=True) \
        if _plain(meta / "tokenizer_config.json") else None
    for kind in ("bos", "eos", "pad"):
        value = next((s[f"{kind}_token_id"] for s in sources if isinstance(s, dict)
                      and s.get(f"{kind}_token_id") is not None), None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None and isinstance(tokens, dict) and isinstance(tokens.get(f"{kind}_token"), str):
            value = tokenizer.token_to_id(tokens[f"{kind}_token"]) if tokenizer is not None else None
        found[kind] = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    return found


def load_tokenizer(meta: Path):
    """The ``tokenizers`` tokenizer in ``meta/tokenizer.json``, or None when there is none."""
    path = meta / "tokenizer.json"
    if not path.exists():
        return None
    if not _plain(path):
        raise ConfigError(f"{path} is not a plain file of at most {_TEXT_FILE_LIMIT >> 20} MB")
    from dlopt.core.optional import require

    tokenizers = require("tokenizers", "llm", "reading a decoder's tokenizer needs the tokenizers package")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser's errors
        raise ModelError(f"{path} is not a tokenizer the tokenizers package can read: {first_line(exc)}") from exc


def _export_here(folder: Path, gguf: str | None, work: Path) -> dict:
    import resource

    from dlopt.core.optional import require
    import gc

    from dlopt.llm.export import compare_decoder, decoder_reference, export_decoder, remove_decoder
    from dlopt.llm.source import load_causal_lm

    transformers = require("transformers", "llm", "exporting a decoder needs transformers")
    model = load_causal_lm(folder, gguf_file=gguf)
    model.config.save_pretrained(str(work))
    if gguf is not None:  # the model builder (dlopt.llm.fused) reads safetensors, not a quantised GGUF
        _save_plain_config(model, work / HF_COPY)
        save_safetensors(model, work / HF_COPY / "model.safetensors")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(work))
    phases = {"loaded_mb": _rss_mb()}
    reference = decoder_reference(model)
    path = export_decoder(model, work / "model.onnx", check=False)
    phases["exported_mb"] = _rss_mb()
    del model  # the check holds ONNX Runtime's copy of the weights alone
    gc.collect()
    _trim()
    try:
        match = compare_decoder(path, reference)
    except BaseException:
        remove_decoder(path)
        raise
    phases["checked_mb"] = _rss_mb()
    logger.info("decoder exported to %s: logits within %.1e (prefill) and %.1e (decode) of the module", path,
                match.prefill, match.decode)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer of {folder}: {first_line(exc)}") from exc
    tokenizer.save_pretrained(str(work))
    if gguf is not None:  # the builder writes the tokenizer's files for ONNX Runtime GenAI too
        tokenizer.save_pretrained(str(work / HF_COPY))
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **phases}


def _save_plain_config(model, folder: Path) -> None:
    """config.json of a GGUF-loaded model as a float32 checkpoint's: without its GGUF quantization_config (which
    would send a reader back to the GGUF file) and naming its architecture (which a GGUF's config lacks)."""
    import json

    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_safetensors(model, path: Path) -> int:
    """``model``'s state dict as a safetensors file, written a tensor at a time (safetensors' own ``save_file``
    holds a bytes copy of every tensor at once); a tensor shared by two names (tied embeddings) is written once,
    under the first.  The bytes written."""
    import json
    import struct

    import torch

    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}
    tensors, seen, header, offset = [], set(), {}, 0
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen or tensor.dtype not in codes:
            continue
        seen.add(key)
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        tensors.append(tensor)
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for tensor in tensors:
            handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return 8 + len(blob) + offset


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc keeps what torch freed; the check needs it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_mb() -> float:
    """This process's peak RSS so far, in MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return child_main(lambda a: _export_here(Path(a[0]), a[1] or None, Path(a[2])), argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
