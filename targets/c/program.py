"""The C program around the generated steps: buffer lifetimes, the arena plan, model.c and model.h.

Guarantees:
- ``emit`` gives every computed tensor bytes in one static arena placed by ``c_memory.plan``;
  the model's inputs are read from the caller's pointers and never written, and outputs are
  copied to the caller's at the end.
- Reshape-like steps cost nothing (the output is the input's bytes); elementwise steps write
  over their input when no later step reads it (in place).
- Steps whose results reach no output are dropped (a DequantizeLinear whose readers all
  became int8 kernels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from dlopt.core.errors import ModelError
from dlopt.targets.c import memory as c_memory

_CTYPE = {"f": "float", "q": "int8_t"}


@dataclass
class Step:
    code: Callable[[Callable[[str], str]], str]  # given ptr(tensor) -> C statement(s)
    reads: list[str]
    writes: list[str]
    alias: bool = False  # writes share the first read's bytes
    op: str = ""
    inplace: bool = False  # may write over its first read when nothing later reads it


@dataclass
class Generated:
    model_c: str
    model_h: str
    plan: c_memory.Plan
    weights_bytes: int
    inputs: list[dict]
    outputs: list[dict]
    ops: dict[str, int] = field(default_factory=dict)


def _fmt(values: np.ndarray, kind: str) -> str:
    flat = values.reshape(-1)
    if kind == "float":
        if not np.all(np.isfinite(flat)):
            raise ModelError("a weight is not finite (inf or NaN); the C backend stores finite floats only")
        items = [_float(float(v)) for v in flat.astype(np.float32)]
    else:
        items = [str(int(v)) for v in flat]
    return ",\n".join(", ".join(items[i:i + 12]) for i in range(0, len(items), 12))


_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 _.,:;=+\-()\[\]]")


def comment_text(text: str, limit: int = 64) -> str:
    """``text`` (a model's tensor or node name) made safe inside a C ``/* */`` comment: letters, digits,
    spaces and ``_.,:;=+-()[]`` stay, anything else becomes ``_``, runs of whitespace one space; at most
    ``limit`` characters.  So no ``*/``, ``/*``, backslash (line splice), ``??`` (trigraphs) or line
    break from a name reaches the compiler: a name cannot end its comment and add code."""
    safe = _COMMENT_UNSAFE.sub("_", " ".join(str(text).split()))
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def _float(v: float) -> str:
    text = f"{v:.9g}"
    return (text if any(c in text for c in ".en") else text + ".0") + "f"


def _live_steps(gen) -> list[Step]:
    """The steps whose results reach an output: a DequantizeLinear whose readers all became int8
    kernels computes nothing anyone reads."""
    needed = set(gen.outputs)
    kept = []
    for step in reversed(gen.steps):
        if any(t in needed for t in step.writes):
            kept.append(step)
            needed.update(step.reads)
        else:
            gen.ops[step.op] -= 1
    gen.ops = {op: n for op, n in gen.ops.items() if n}
    return kept[::-1]


class _Groups:
    """Union-find over tensor names: tensors in one group share bytes."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, into: str, other: str) -> None:
        self.parent[self.find(other)] = self.find(into)



def emit(gen, *, header_note: str = "") -> Generated:
    """model.c and model.h from ``gen`` (a dlopt.targets.c.codegen generator that has run)."""
    for name in gen.outputs:
        if gen.kind.get(name) != "f":
            raise ModelError(f"output {name!r} is not a float tensor the C backend computed")
    steps = _live_steps(gen)
    first, last = _lifetimes(steps, gen.outputs)
    share = _Sharing(gen, last)
    for i, step in enumerate(steps):
        share.step(i, step)
    plan = c_memory.plan(share.buffers(first))
    single = len(gen.inputs) == 1 and len(gen.outputs) == 1
    in_names = ["input"] if single else [f"input{k}" for k in range(len(gen.inputs))]
    out_names = ["output"] if single else [f"output{k}" for k in range(len(gen.outputs))]

    def ptr(t: str) -> str:
        root = share.groups.find(t)
        ctype = _CTYPE[gen.kind[t]]
        for k, name in enumerate(gen.inputs):
            if share.groups.find(name) == root:
                return f"{in_names[k]}"
        return f"(({ctype} *)(dl_arena + {plan.offsets[root]}))"

    body = [step.code(ptr) for step in steps]
    for k, t in enumerate(gen.outputs):
        body.append(f"memcpy({out_names[k]}, {ptr(t)}, {share.nbytes(t)});")
    io_in = [{"name": t, "c_name": in_names[k], "shape": list(gen.shapes[t]), "floats": gen.numel(t)}
             for k, t in enumerate(gen.inputs)]
    io_out = [{"name": t, "c_name": out_names[k], "shape": list(gen.shapes[t]), "floats": gen.numel(t)}
              for k, t in enumerate(gen.outputs)]
    header_note = f" {comment_text(header_note, 120)}" if header_note.strip() else ""
    params = ", ".join([f"const float *{n}" for n in in_names] + [f"float *{n}" for n in out_names])
    model_c = _model_c(gen, plan, body, in_names, params, header_note)
    model_h = _model_h(plan, in_names + out_names, io_in + io_out, params, header_note)
    return Generated(model_c, model_h, plan, gen.weights_bytes, io_in, io_out, gen.ops)


def _lifetimes(steps: list, outputs: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """The step that first writes each tensor and the last that reads it (outputs live to the end)."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for t in step.writes:
            first.setdefault(t, i)
            last.setdefault(t, i)
        for t in step.reads:
            last[t] = max(last.get(t, i), i)
    for t in outputs:
        last[t] = len(steps)
    return first, last


class _Sharing:
    """Which tensors share one buffer: an alias (Reshape, Flatten) always, an in-place op's output where its
    input is dead after it, the same size and kind, and not a model input."""

    def __init__(self, gen, last: dict[str, int]) -> None:
        self.gen, self.last = gen, last
        self.groups = _Groups()
        self.members: dict[str, list[str]] = {}
        self.inputs = set(gen.inputs)

    def nbytes(self, t: str) -> int:
        return self.gen.numel(t) * (4 if self.gen.kind[t] == "f" else 1)

    def group_last(self, root: str) -> int:
        return max(self.last.get(m, 0) for m in self.members.get(root, [root]))

    def is_input(self, root: str) -> bool:
        return any(self.groups.find(i_) == root for i_ in self.inputs)

    def join(self, into: str, other: str) -> None:
        a, b = self.groups.find(into), self.groups.find(other)
        self.groups.union(a, b)
        self.members[a] = self.members.get(a, [a]) + self.members.pop(b, [b])

    def step(self, i: int, step) -> None:
        x, out = (step.reads[0] if step.reads else None), step.writes[0]
        if step.alias:
            self.join(x, out)
        elif step.inplace and x is not None:
            root = self.groups.find(x)
            if (not self.is_input(root) and self.group_last(root) <= i and self.nbytes(x) == self.nbytes(out)
                    and self.gen.kind[x] == self.gen.kind[out]):
                self.join(x, out)

    def buffers(self, first: dict[str, int]) -> list:
        """One arena buffer per group that is not a model input: its largest tensor, first write to last read."""
        roots: dict[str, c_memory.Buffer] = {}
        for t in first:
            root = self.groups.find(t)
            if self.is_input(root):
                continue
            ms = self.members.get(root, [root])
            roots[root] = c_memory.Buffer(root, max(self.nbytes(m) for m in ms if m in first),
                                          min(first[m] for m in ms if m in first), self.group_last(root))
        return list(roots.values())


def _model_c(gen, plan, body: list[str], in_names: list[str], params: str, header_note: str) -> str:
    arena = max(plan.arena, c_memory.ALIGN)
    return "\n".join([
        f"/* Generated by dlopt{header_note}: do not edit. Weights are const (flash); activations share one",
        f"   static arena of {plan.arena} bytes (liveness lower bound {plan.lower_bound} bytes). */",
        "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>",
        '#include "dlopt_kernels.h"', '#include "model.h"', "",
        f"static uint8_t dl_arena[{arena}] __attribute__((aligned({c_memory.ALIGN})));", "",
        "#ifdef DLOPT_REQUANT_FLOAT  /* int8: ONNX Runtime's float requantisation instead of TFLite's */",
        "#define DL_FSCALE(a) (a)", "#else", "#define DL_FSCALE(a) NULL", "#endif", "",
        *gen.decls, "",
        f"int dlopt_model_run({params}) {{",
        *[f"    (void){n};" for n in in_names], "    (void)dl_arena;",
        *[f"    {line}" for line in body if line], "    return 0;", "}", ""])


def _model_h(plan, names: list[str], io: list[dict], params: str, header_note: str) -> str:
    guard = "DLOPT_MODEL_H"
    defines = [f"#define DLOPT_MODEL_{n.upper()}_FLOATS {d['floats']}  /* {comment_text(d['name'])}: {d['shape']} */"
               for n, d in zip(names, io)]
    return "\n".join([
        f"/* Generated by dlopt{header_note}. */", f"#ifndef {guard}", f"#define {guard}", "",
        *defines, f"#define DLOPT_MODEL_ARENA_BYTES {max(plan.arena, c_memory.ALIGN)}", "",
        "#ifdef __cplusplus", 'extern "C" {', "#endif",
        "/* Runs the model once (batch 1, NCHW floats); returns 0. Not re-entrant: one static arena. */",
        f"int dlopt_model_run({params});",
        "#ifdef __cplusplus", "}", "#endif", f"#endif /* {guard} */", ""])


def prepare(model: onnx.ModelProto, shapes: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with static input shapes (a symbolic batch is 1) and every shape inferred."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    init = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ModelError(f"input {vi.name!r} is not float32; the C backend's entry point takes float arrays")
        declared = (shapes or {}).get(vi.name)
        for k, dim in enumerate(vi.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                value = declared[k] if declared is not None and k and k < len(declared) else 1
                dim.Clear()
                dim.dim_value = int(value)
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_value != 1:
            raise ModelError(f"input {vi.name!r} has batch {vi.type.tensor_type.shape.dim[0].dim_value}; "
                             f"the C backend builds batch 1 (export with a symbolic or unit batch)")
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed for the C backend: {str(exc).splitlines()[0]}") from exc

