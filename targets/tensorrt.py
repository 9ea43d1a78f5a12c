"""TensorRT backend: an engine-build bundle, because engines are built on the device.

A TensorRT engine is tied to the GPU model and the TensorRT version it was built
with, so dlopt does not pretend to build one for a board that is not attached.
It writes what the board needs to build it: the optimised ONNX for the chosen
precision (explicit Q/DQ for int8, symmetric, as TensorRT requires), a
``build_engine.sh`` calling ``trtexec`` with the right precision flags (and, for
a model with symbolic dims, an optimisation profile from the declared timing
shape), and a README.  The same ONNX is verified on ONNX Runtime here (the ``ort`` rows of the
report); the engine's latency is "not measured" until it runs on the device.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import onnx_ir as ir

from dlopt.core.errors import ModelError, TargetUnavailable
from dlopt.core.graph_facts import op_label
from dlopt.core.model_io import save_ir
from dlopt.core.profiles import DeviceKind
from dlopt.targets.base import Artifact, Backend
from dlopt.targets.ort import TRITON_TRT_PRECISION

name = "tensorrt"

# Ops the ONNX-TensorRT parser documents as unsupported (TensorRT 8.x support matrix,
# the oldest release the presets' boards ship).  Other domains (com.microsoft, ...) are
# not parsed at all.
UNSUPPORTED_OPS = frozenset({
    "BitShift", "Compress", "ConcatFromSequence", "ConvInteger", "Det", "DynamicQuantizeLinear",
    "Hardmax", "IsInf", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MeanVarianceNormalization",
    "Mod", "Multinomial", "NegativeLogLikelihoodLoss", "NonZero", "OneHot", "QLinearConv",
    "QLinearMatMul", "RandomNormal", "RandomNormalLike", "Reciprocal", "RoiAlign", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "Shrink", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer",
    "Unique",
})

# precision -> trtexec flags; int8 keeps fp16 allowed so layers left in float run in fp16.
TRTEXEC_FLAGS = {"fp32": "", "fp16": "--fp16", "int8": "--int8 --fp16", "mixed": "--int8 --fp16"}


# trtexec splits --shapes on ',' and reads a quote as the start of a quoted name, and older
# releases split each item on the first ':'; a name holding one of these cannot be written.
_SHAPES_SYNTAX = (",", ":", "'")

# A symbolic batch is built for 1 .. max(MAX_BATCH_FLOOR, MAX_BATCH_FACTOR x the timed batch).
MAX_BATCH_FLOOR = 8
MAX_BATCH_FACTOR = 2


def _checked_name(name: str) -> str:
    bad = [c for c in _SHAPES_SYNTAX if c in name]
    if bad:
        raise ModelError(
            f"input {name!r} cannot be passed to trtexec --shapes: its name contains "
            f"{' and '.join(repr(c) for c in bad)}; rename the input to build a TensorRT bundle")
    return name


def optimization_profile(model, shapes=None) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of each input with symbolic dims; empty for a static model.

    opt is the declared timing shape (1 where none was declared).  A symbolic batch (axis 0)
    runs from 1 to max(MAX_BATCH_FLOOR, MAX_BATCH_FACTOR x opt); any other symbolic dim (a
    sequence length, an image side) is pinned to its declared size, min = opt = max: layers
    after it (Reshapes, attention) are often only valid for the size the model was checked at.
    """
    profile = {}
    for value in model.graph.inputs:
        dims = list(value.shape or [])
        if value.name in model.graph.initializers or all(isinstance(d, int) for d in dims):
            continue
        declared = (shapes or {}).get(value.name)
        if declared is None or len(declared) != len(dims):
            declared = [d if isinstance(d, int) else 1 for d in dims]
        opt = [int(d) if isinstance(d, int) else int(declared[i]) for i, d in enumerate(dims)]
        low, high = list(opt), list(opt)
        if not isinstance(dims[0], int):
            low[0], high[0] = 1, max(MAX_BATCH_FLOOR, MAX_BATCH_FACTOR * opt[0])
        profile[_checked_name(value.name)] = {"min": low, "opt": opt, "max": high}
    return profile


def _static_shapes(model) -> dict[str, list[int]]:
    return {_checked_name(v.name): [d if isinstance(d, int) else 1 for d in (v.shape or [])]
            for v in model.graph.inputs}


def _shape_flag(flag: str, shapes: dict[str, list[int]]) -> str:
    """``--flag=name:1x3x224x224,...`` shell-quoted: input names are the model's, never shell syntax."""
    return shlex.quote(f"--{flag}=" + ",".join(f"{n}:{_dims(s)}" for n, s in shapes.items()))


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _shape_flags(profile: dict, static: dict | None) -> str:
    if not profile:
        return _shape_flag("shapes", static)
    return " ".join(_shape_flag(f"{key}Shapes", {n: p[key] for n, p in profile.items()})
                    for key in ("min", "opt", "max"))


# -- the output README and Triton ---------------------------------------------------------------------

def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape) if isinstance(shape, list) else "?"


def triton_engine(plain_file) -> Path | None:
    """The engine built on the device (model.plan or model.engine), or None."""
    return next((p for p in (plain_file(f) for f in ("model.plan", "model.engine")) if p), None)


class TensorRtBackend(Backend):
    name, entry, settings_file = name, "model.onnx", "tensorrt_build.json"
    checked_elsewhere, unbuilt_note = " on ONNX Runtime", "engine not built yet; "
    not_run_by_script = "build the engine with build_engine.sh and time it with trtexec --loadEngine=model.engine"

    def runs_with_dlopt(self, settings: dict) -> bool:
        return False

    def available(self) -> bool | str:
        return True  # writing the bundle needs no TensorRT here; building the engine happens on the device

    def precisions(self, profile) -> tuple[str, ...]:
        return ("fp16", "int8", "mixed") if profile.device is DeviceKind.GPU else ()

    def supports(self, model) -> list[str]:
        missing = set()
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type in UNSUPPORTED_OPS:
                missing.add(op_label(node))
        return sorted(missing)

    def runtime_version(self) -> str:
        # The engine is built on the device with its TensorRT: the bundle depends only on its own format.
        return "bundle-1"

    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int, shapes=None) -> Artifact:
        del threads  # engines pick their own kernels on the device
        profile_shapes = optimization_profile(model, shapes)
        static = None if profile_shapes else _static_shapes(model)
        shape_flags = _shape_flags(profile_shapes, static)  # checked before anything is written
        workdir.mkdir(parents=True, exist_ok=True)
        files = [f.name for f in save_ir(model, workdir / "model.onnx")]
        flags = TRTEXEC_FLAGS[precision]
        script = workdir / "build_engine.sh"
        script.write_text(
            "#!/bin/sh\n"
            "# Build the TensorRT engine on the target device itself: an engine only runs on the\n"
            "# GPU model and TensorRT version it was built with.  Needs trtexec (JetPack ships it\n"
            "# at /usr/src/tensorrt/bin/trtexec); set TRTEXEC to use another.\n"
            "set -eu\n"
            'cd "$(dirname "$0")"\n'
            'TRTEXEC="${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}"\n'
            f'"$TRTEXEC" --onnx=model.onnx --saveEngine=model.engine {flags} {shape_flags} '
            '--skipInference "$@"\n'
            'echo "engine written to $(pwd)/model.engine"\n'
        )
        script.chmod(0o755)
        settings = {
            "target": profile.name, "gpu_arch": profile.cuda_arch, "precision": precision,
            "trtexec_flags": flags, "engine": "not built: run build_engine.sh on the device",
            "optimization_profile": profile_shapes or None, "static_shapes": static,
            "int8": "explicit Q/DQ in model.onnx (symmetric), no calibration cache needed" if "int8" in flags else None,
        }
        (workdir / "tensorrt_build.json").write_text(json.dumps(settings, indent=2) + "\n")
        ranges = "".join(f"Input {n} is built for shapes {_dims(p['min'])} to {_dims(p['max'])}, tuned for "
                         f"{_dims(p['opt'])}.\n" for n, p in profile_shapes.items())
        ranges += "\n" if ranges else ""
        (workdir / "README.txt").write_text(
            f"TensorRT bundle for {profile.description}, precision {precision}.\n\n"
            "On the device:\n  ./build_engine.sh            # writes model.engine\n"
            "  trtexec --loadEngine=model.engine   # measures latency there\n\n"
            f"{ranges}"
            "model.onnx was checked against the original model on ONNX Runtime when it was built;\n"
            "the engine itself is not: check it on the device before trusting it.  The output folder's\n"
            "top level (this folder, or two levels up for a bundle/ candidate) holds verify.npz: a few\n"
            "evaluation inputs, the original model's outputs on them and the error each candidate may\n"
            "show.  dlopt's run_candidates.py and `dlopt verify` do not run TensorRT engines yet (they\n"
            "list this candidate as skipped); compare the engine's outputs on those inputs with\n"
            "trtexec (--loadInputs, --exportOutput) or your own TensorRT runner.\n"
        )
        return Artifact(
            backend=name, precision=precision, folder=workdir,
            files=files + ["build_engine.sh", "tensorrt_build.json", "README.txt"],
            entry="model.onnx", loadable_here=False, settings=settings, check_onnx="model.onnx",
        )

    def load(self, artifact: Artifact):
        raise NotImplementedError("TensorRT engines are built and run on the device (build_engine.sh)")

    def check_runs_here(self, artifact: Artifact) -> None:
        # The bundle holds the ONNX and the script that builds the engine on the device; no engine yet.
        raise TargetUnavailable(
            f"{artifact.backend}/{artifact.precision} in {artifact.folder} is a TensorRT engine-build bundle: build the "
            f"engine on the device (./build_engine.sh, needs TensorRT's trtexec) and run it there; dlopt does not run "
            f"TensorRT engines")

    def install_lines(self, shipped: list, text) -> list[str]:
        folders = ", ".join(f"`{s.path('build_engine.sh')}`" for s in shipped)
        settings = shipped[0].settings  # every precision is built for the same shapes
        shapes = [f"{text(n)} from {_dims(p.get('min'))} to {_dims(p.get('max'))} (tuned for {_dims(p.get('opt'))})"
                  for n, p in (settings.get("optimization_profile") or {}).items()]
        shapes += [f"{text(n)} at {_dims(shape)} only" for n, shape in (settings.get("static_shapes") or {}).items()]
        verb = "each call" if len(shipped) > 1 else "calls"
        return [f"TensorRT ({', '.join(s.key for s in shipped)}), on a Jetson from JetPack: {folders} {verb} `trtexec` "
                "(/usr/src/tensorrt/bin/trtexec; set TRTEXEC for another), which writes model.engine beside it"
                + (f"; the engine takes {', '.join(shapes)}" if shapes else "")
                + "; run_candidates.py and `dlopt verify` do not run TensorRT engines yet (they list them as skipped)"]

    def readme_verify(self, shipped: list, verify_file: str, script: str) -> list[str]:
        return [f"Build the TensorRT engine{'s' if len(shipped) > 1 else ''} first ("
                + ", ".join(f"`{s.path('build_engine.sh')}`" for s in shipped) + "); "
                "`trtexec --loadEngine=model.engine` in its folder times it alone.  Checking an engine's "
                f"outputs against {verify_file} is not automated yet: {script} and `dlopt verify` skip TensorRT "
                "candidates (their ONNX was verified on ONNX Runtime when built).", ""]

    def fill_triton(self, config, artifact: Artifact, plain_file) -> str:
        """``model.plan`` on Triton's TensorRT platform once the engine was built on the device; before that the
        bundle's ONNX on ORT with the TensorRT accelerator, which builds the engine when Triton loads it."""
        if triton_engine(plain_file) is not None:
            config.platform, config.backend = "tensorrt_plan", "tensorrt"
            config.default_model_filename = "model.plan"
        else:
            config.platform, config.backend = "onnxruntime_onnx", "onnxruntime"
            trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = TRITON_TRT_PRECISION.get(artifact.precision, "FP32")
            config.default_model_filename = "model.onnx"
        return "KIND_GPU"


BACKEND = TensorRtBackend()
