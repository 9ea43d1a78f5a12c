"""The names and shape of a decoder's KV cache, as optimum writes them (and ONNX Runtime GenAI reads them).

Inputs ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past + sequence], ``position_ids``
[batch, sequence] (all int64) and ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim];
outputs ``logits`` [batch, sequence, vocab] and ``present.{i}.key|value`` [batch, kv_heads, past + sequence,
head_dim].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from dlopt.core.errors import ModelError

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
KINDS = ("key", "value")
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class KVLayout:
    """How many layers the cache has and the shape of each layer's key and value (after batch and length)."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def past_names(self) -> list[str]:
        """``past_key_values.0.key``, ``past_key_values.0.value``, ``past_key_values.1.key``, ...: layer by layer."""
        return [past_name(i, kind) for i in range(self.layers) for kind in KINDS]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, kind) for i in range(self.layers) for kind in KINDS]


def layout_from_graph(inputs: Sequence, outputs: Sequence, model: str = "the model") -> KVLayout:
    """The KV layout of a graph from its inputs and outputs (objects with ``.name`` and ``.shape``, as
    ONNX Runtime's ``get_inputs()`` gives them); ModelError in one line when it is no decoder with a cache."""
    shapes = {i.name: list(i.shape) for i in inputs}
    found = {(int(m[1]), m[2]) for m in map(_PAST.fullmatch, shapes) if m}
    if not found:
        raise ModelError(f"{model} has no past_key_values.* inputs: it is not a decoder exported with its KV cache "
                         "(export it with dlopt.llm.export.export_decoder or optimum's text-generation-with-past)")
    layers = max(layer for layer, _ in found) + 1
    names = {i.name for i in outputs}
    missing = [past_name(i, kind) for i in range(layers) for kind in KINDS if (i, kind) not in found]
    missing += [INPUT_IDS] * (INPUT_IDS not in shapes)
    missing += [n for n in [LOGITS, *KVLayout(layers, 0, 0).present_names] if n not in names]
    if missing:
        raise ModelError(f"{model} is a KV-cache decoder without {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}: every layer needs past_key_values.{{i}}.key|value "
                         "inputs and present.{i}.key|value outputs, with input_ids and logits")
    dims = {tuple(shapes[n][1::2]) if len(shapes[n]) == 4 else None for n in KVLayout(layers, 0, 0).past_names}
    if len(dims) != 1 or None in dims or not all(isinstance(d, int) and d > 0 for d in next(iter(dims))):
        raise ModelError(f"{model}'s past_key_values inputs are not all [batch, kv_heads, past, head_dim] with the "
                         f"same fixed kv_heads and head_dim: {shapes[past_name(0, 'key')]}")
    kv_heads, head_dim = next(iter(dims))
    return KVLayout(layers, kv_heads, head_dim)


def layout_from_proto(proto, model: str = "the model") -> KVLayout:
    """:func:`layout_from_graph` of an ``onnx.ModelProto`` (loaded without its weights)."""
    return layout_from_graph(_specs(proto.graph.input), _specs(proto.graph.output), model)


def _specs(values) -> list:
    """``.name``/``.shape`` of a proto's value infos, as ``get_inputs()`` gives them (a symbolic dim: its name)."""
    class Spec:
        def __init__(self, value):
            self.name = value.name
            self.shape = [d.dim_value if d.HasField("dim_value") else d.dim_param
                          for d in value.type.tensor_type.shape.dim]

    return [Spec(v) for v in values]
