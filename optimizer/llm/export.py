"""A transformers causal LM to one ONNX decoder with its KV cache, checked against the module.

Guarantees: when :func:`export_decoder` returns, ``path`` holds a model with optimum's input and output
names (``dlopt.llm.kv``), symbolic batch, sequence and past axes, that ONNX Runtime runs to the module's
logits within ``atol`` both on a prefill with an empty past and on one decode step (s=1) fed the prefill's
own cache.  torch.export specialises axes of size 0 and 1, so the export traces a batch of 2, a sequence
of 3 and a past of 4; the two checks then cover the shapes generation uses.  When a check fails the file
is removed and CompileError names what differed.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlopt.compression.exporter import export
from dlopt.core.errors import CompileError, ConfigError
from dlopt.core.optional import require
from dlopt.llm.kv import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, KVLayout
from dlopt.llm.session import DecoderSession

logger = logging.getLogger(__name__)

# The shapes traced: none may be 0 or 1 (torch.export would fix that axis in the graph).
_TRACE_BATCH, _TRACE_SEQUENCE, _TRACE_PAST = 2, 3, 4
_CHECK_PROMPT = 5


@dataclass(frozen=True)
class DecoderMatch:
    """Largest absolute logits error between the ONNX file and the module, per phase."""

    prefill: float
    decode: float


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layout_of(config: Any) -> KVLayout:
    """The KV layout a transformers config implies (its text part, for a multimodal one)."""
    config = _text_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVLayout(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def export_decoder(model: Any, path: str | os.PathLike, *, opset: int | None = None, atol: float = 1e-4,
                   check: bool = True) -> Path:
    """Export ``model`` (a float32 transformers causal LM: ``LlamaForCausalLM`` and friends) with its KV
    cache to ``path`` through :func:`dlopt.export`, then check it (see the module's guarantees).  The weights
    go to ``<path>.data``.  ``check=False`` leaves the check to the caller: ``compare_decoder(path,
    decoder_reference(model))`` once it has let go of the module (the reference taken before the export), so
    it holds one copy of the weights at a time, not the module's and ONNX Runtime's together.

    Raises ConfigError for a model that is not float32, CompileError when no exporter succeeds or the file
    differs from the module by more than ``atol`` on the logits."""
    torch = require("torch", "llm", "exporting a decoder needs torch")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ConfigError(f"export_decoder needs a float32 model, this one is {str(dtype).removeprefix('torch.')}: "
                          "load it with dtype=torch.float32")
    layout = layout_of(model.config)
    wrapper = decoder_with_past(model, layout)
    generator = torch.Generator().manual_seed(0)
    batch, seq, past = _TRACE_BATCH, _TRACE_SEQUENCE, _TRACE_PAST
    example = (torch.randint(0, _text_config(model.config).vocab_size, (batch, seq), generator=generator),
               torch.ones(batch, past + seq, dtype=torch.int64),
               torch.arange(past, past + seq).expand(batch, seq).contiguous(),
               *(torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=generator)
                 for _ in layout.past_names))
    axes = {INPUT_IDS: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
            POSITION_IDS: {0: "batch", 1: "sequence"}, **{n: {0: "batch", 2: "past_sequence"} for n in layout.past_names}}
    with warnings.catch_warnings():
        # torch.onnx keeps one name per set of equal axes ("batch" of every input) and warns about the others
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        # the check is check_decoder's, on a prompt and a decode step (export's own would run the random trace
        # example, with a second copy of the weights in ONNX Runtime beside the module's)
        path = Path(export(wrapper, example, path, axes, output_names=[LOGITS, *layout.present_names], opset=opset,
                           input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *layout.past_names],
                           verify=False, external_data=True))
    del wrapper, example
    if not check:
        return path
    try:
        match = check_decoder(model, path, atol=atol)
    except BaseException:
        remove_decoder(path)
        raise
    logger.info("decoder exported to %s: logits within %.1e (prefill) and %.1e (decode) of the module",
                path, match.prefill, match.decode)
    return path


def remove_decoder(path: str | os.PathLike) -> None:
    """Remove a decoder file and its weights (after a failed check)."""
    path = Path(path)
    for written in (path, path.with_name(path.name + ".data")):
        written.unlink(missing_ok=True)


def decoder_with_past(model: Any, layout: KVLayout):
    """A module ``forward(input_ids, attention_mask, position_ids, *flat_past)`` returning the logits and every
    layer's present key and value.  Its signature names each past tensor, so torch.export's ``dynamic_shapes``
    (one entry per input) matches the arguments one to one."""
    torch = require("torch", "llm", "exporting a decoder needs torch")
    transformers = require("transformers", "llm", "exporting a decoder needs transformers")
    # transformers 5.2x renames the forward's ``past_key_values`` to ``cache`` (the old name warns until 5.40)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = transformers.DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layout.layers)], config=model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{keyword: cache})
            present = out.cache if keyword == "cache" else out.past_key_values
            return (out.logits, *(t for layer in present.layers[:layout.layers] for t in (layer.keys, layer.values)))

    names = ["self", INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *(n.replace(".", "_") for n in layout.past_names)]
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    DecoderWithPast.forward.__signature__ = inspect.Signature(parameters)
    return DecoderWithPast().eval()


@dataclass(frozen=True)
class DecoderReference:
    """The module's logits on a prefill of ``ids[:-1]`` with an empty past and on a decode step of ``ids[-1]``."""

    ids: np.ndarray
    prefill: np.ndarray  # [prompt, vocab]
    decode: np.ndarray   # [vocab]
    layout: KVLayout


def decoder_reference(model: Any, *, prompt: int = _CHECK_PROMPT) -> DecoderReference:
    """What :func:`compare_decoder` checks a file against, from ``model`` in torch (each side feeds its own cache)."""
    torch = require("torch", "llm", "checking a decoder needs torch")
    layout = layout_of(model.config)
    wrapper = decoder_with_past(model, layout)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, _text_config(model.config).vocab_size, (1, prompt + 1), generator=generator)
    empty = [torch.zeros(1, layout.kv_heads, 0, layout.head_dim) for _ in layout.past_names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prefill = wrapper(ids[:, :prompt], torch.ones(1, prompt, dtype=torch.int64), torch.arange(prompt)[None], *empty)
            decode = wrapper(ids[:, prompt:], torch.ones(1, prompt + 1, dtype=torch.int64), torch.tensor([[prompt]]),
                             *prefill[1:])
    finally:
        model.train(was_training)
    return DecoderReference(ids[0].numpy(), prefill[0][0].numpy(), decode[0][0, -1].numpy(), layout)


def check_decoder(model: Any, path: str | os.PathLike, *, atol: float = 1e-4, prompt: int = _CHECK_PROMPT) -> DecoderMatch:
    """Run ``path`` on ONNX Runtime and ``model`` in torch on a prefill of ``prompt`` tokens with an empty past,
    then one decode step, each side fed its own cache; CompileError when the logits differ by more than ``atol``."""
    return compare_decoder(path, decoder_reference(model, prompt=prompt), atol=atol)


def compare_decoder(path: str | os.PathLike, reference: DecoderReference, *, atol: float = 1e-4) -> DecoderMatch:
    """``path`` on ONNX Runtime against ``reference`` (see :func:`check_decoder`)."""
    session = DecoderSession(path)
    if session.layout != reference.layout:
        raise CompileError(f"{Path(path).name} has a KV cache of {session.layout}, the module {reference.layout}")
    ids = reference.ids.tolist()
    errors = {}
    for phase, got, want in (("prefill with an empty past", session.prefill(ids[:-1]), reference.prefill),
                             ("decode step", session.step(ids[-1]), reference.decode)):
        if got.shape != want.shape:
            raise CompileError(f"{Path(path).name} differs from the module on a {phase}: logits of shape "
                               f"{list(got.shape)} where the module's are {list(want.shape)}")
        errors[phase] = float(np.abs(got.astype(np.float64) - want).max())
        if not errors[phase] <= atol:
            raise CompileError(f"{Path(path).name} differs from the module on a {phase}: max abs logits error "
                               f"{errors[phase]:.3e} (limit {atol:g})")
    return DecoderMatch(*errors.values())
