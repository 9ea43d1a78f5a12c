"""OpenVINO backend: OpenVINO IR (model.xml + model.bin) and the CPU plugin settings to run it.

Guarantees:

* ``compile`` writes ``model.xml``, ``model.bin`` and ``runtime_config.json`` into the
  workdir and nothing else (the ONNX file handed to OpenVINO's converter is deleted).
  Weights are stored in f16 only for the ``fp16`` candidate.
* Every artefact names its inference precision explicitly.  Left implicit, OpenVINO's
  CPU plugin runs f32 models in bf16 on CPUs with AMX or AVX512-BF16, so an "fp32"
  candidate would silently be a bf16 one.
* ``load(...).ran_as`` is read back from the compiled model's runtime graph (the
  precision its convolutions and matrix products execute in), not copied from the
  artefact's label.

OpenVINO is imported inside functions, once, so listing backends stays fast.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx_ir as ir

from dlopt.core.errors import CompileError, ConfigError, TargetUnavailable, first_line
from dlopt.core.graph_facts import converter_hazards, op_label
from dlopt.core.model_io import save_ir
from dlopt.core.profiles import host_arch, DeviceKind
from dlopt.targets import snippets
from dlopt.targets.base import Artifact, Backend
from dlopt.targets.ort import threads_from_file

logger = logging.getLogger(__name__)

name = "openvino"
# OpenVINO compresses weights to fp16 itself when saving: it gets the float model for fp16.
OWN_PRECISIONS = ("fp16",)
ENTRY = "model.xml"
SETTINGS_FILE = "runtime_config.json"
DEVICE = "CPU"

# INFERENCE_PRECISION_HINT per candidate.  It governs the float parts of the graph:
# QDQ (int8/mixed) layers still run in int8 under an f32 hint.  fp16 IR gets f32 too:
# the CPU plugin decompresses f16 weights and computes in f32 (fp16 here shrinks the
# artefact; it is not a faster kernel on CPU).
_HINTS = {"fp32": "f32", "fp16": "f32", "int8": "f32", "mixed": "f32", "bf16": "bf16"}
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
_FLOAT_ORDER = ("f16", "bf16", "f32")  # lowest first: the one that limits accuracy is reported
_QUANTISED = frozenset({"i8", "u8"})
_KERNEL_PRECISIONS = frozenset({"f32", "bf16", "f16", "i8", "u8"})
# Runtime-graph layer types that do the arithmetic; their precision is what "ran as" means.
_COMPUTE_LAYERS = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul", "GroupConvolution"})


@lru_cache(maxsize=1)
def _ov():
    try:
        import openvino
    except Exception as exc:  # ImportError, or a missing shared library under it
        raise TargetUnavailable(f"openvino is installed but does not import ({first_line(exc)}); "
                                f"reinstall dlopt[openvino]") from exc
    return openvino


@lru_cache(maxsize=1)
def _core():
    return _ov().Core()


@lru_cache(maxsize=1)
def _onnx_frontend():
    # Once per process; the manager owns the frontend's shared library, so both are kept.
    manager = _ov().frontend.FrontEndManager()
    return manager, manager.load_by_framework("onnx")


@contextlib.contextmanager
def _as_onnx_file(model: ir.Model, folder: Path):
    """``model`` written as ONNX under ``folder`` (external data if large), removed afterwards."""
    files = save_ir(model, folder / "_openvino_input.onnx")
    try:
        yield files[0]
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def _unconverted(ov_model, producers: dict[str, str]) -> set[str]:
    """Ops of the nodes OpenVINO's ONNX frontend left unconverted, subgraphs included."""
    missing = set()
    for op in ov_model.get_ops():
        kind = op.get_type_name()
        # Loaded from a file, unconverted nodes are ONNXFrameworkNode (NotSupportedONNXNode from
        # a stream).  Reading their attributes can crash the binding, so they are identified by
        # the tensors they produce, looked up in the ONNX model.
        if kind in ("ONNXFrameworkNode", "NotSupportedONNXNode"):
            outputs = {n for port in op.outputs() for n in port.get_names()}
            missing |= {producers[n] for n in outputs if n in producers} or {f"<node {op.get_friendly_name()}>"}
        # Dispatch on the type name: hasattr() on an unconverted node raises std::bad_alloc.
        if kind == "If":
            bodies = [op.get_then_body(), op.get_else_body()]
        elif kind in ("Loop", "TensorIterator"):
            bodies = [op.get_function()]
        else:
            bodies = []
        for body in bodies:
            missing |= _unconverted(body, producers)
    return missing


def _conversion_failures(frontend, path: Path) -> dict[str, str]:
    """Op type -> the last line of the frontend's failure message, for ops that have a rule but failed."""
    import re

    try:
        frontend.convert(frontend.load(str(path)))
        return {}
    except Exception as exc:  # OpConversionFailure's text lists each failed op with its message
        text = str(exc)
    failures = {}
    for op, message in re.findall(r"^-- (\w+)-\d+ with a message:\n(.*?)(?=^-- |^Summary:|\Z)", text, re.M | re.S):
        lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
        if lines:
            failures.setdefault(op, lines[-1][:200])
    return failures


def runtime_settings(precision: str, threads: int, static_shape: dict | None = None) -> dict:
    """The compile_model configuration an artefact is measured with (JSON-able, OpenVINO's names).

    ``static_shape``: the declared shape of a model with symbolic dims.  The CPU plugin runs a
    model reshaped to static dims much faster (all-MiniLM-L6-v2 INT8 at 8x64, 2 threads: 19.7 ms
    static, 28.5 ms dynamic), so the loader compiles a static copy for that shape and keeps the
    dynamic model for any other."""
    settings = {
        "device": DEVICE,
        "properties": {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
        },
        "openvino_version": _ov().get_version(),
    }
    if static_shape:
        settings["static_shape"] = {k: list(v) for k, v in static_shape.items()}
    return settings


def _symbolic_inputs(model) -> bool:
    return any(not isinstance(d, int) for v in model.graph.inputs if v.name not in model.graph.initializers
               for d in (v.shape or ()))


@contextlib.contextmanager
def _root_logger_kept():
    """OpenVINO's converter (openvino.tools.ovc) sets the root logger to ERROR and adds its own
    filter to it, which silenced every warning of the rest of the process: undo that on the way out."""
    root = logging.getLogger()
    level, filters, handlers = root.level, list(root.filters), list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.filters[:] = filters
        root.handlers[:] = handlers


def _message(exc: BaseException) -> str:
    # OpenVINO's messages start with "Check 'x' failed at <source file>"; the reason is further down.
    lines = [line.strip(" -").rstrip(".") for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Check ", "FrontEnd API failed", "Summary"))]
    return "; ".join(useful[:2]) if useful else first_line(exc)


def executed_precisions(compiled) -> set[str]:
    """Kernel precisions (f32, bf16, f16, i8) the compute layers of ``compiled`` run in."""
    found = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or info["layerType"].astype(str) not in _COMPUTE_LAYERS:
            continue
        # The kernel's name ends in the precision it computes in (brgconv_avx512_amx_I8,
        # brgemm_avx512_f32).  runtimePrecision is the input precision: "f16" for an f32
        # kernel that reads f16 weights, so it only serves when the name says nothing.
        kernel = info["primitiveType"].astype(str).rsplit("_", 1)[-1].lower()
        found.add(kernel if kernel in _KERNEL_PRECISIONS else info["runtimePrecision"].astype(str))
    return found


def ran_as(compiled) -> str:
    """int8 when every compute layer runs quantised, mixed when some do, else the lowest float used."""
    executed = executed_precisions(compiled)
    floats = executed - _QUANTISED
    if executed & _QUANTISED:
        return "mixed" if floats else "int8"
    for precision in _FLOAT_ORDER:
        if precision in floats:
            return _PRECISION_NAMES[precision]
    # No convolution or matrix product: the hint is the best statement of what ran.
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return _PRECISION_NAMES.get(hint, hint)


class OpenVinoSession:
    """Runs the compiled model; feeds of the declared static shape go to the copy compiled for it."""

    def __init__(self, compiled, static=None, static_shape: dict | None = None) -> None:
        self.compiled = compiled  # for inspection: get_runtime_model(), get_property(...)
        self._request = compiled.create_infer_request()
        self._static = static.create_infer_request() if static is not None else None
        self._static_shape = {k: tuple(v) for k, v in (static_shape or {}).items()}
        self._outputs = len(compiled.outputs)
        self.input_names = [port.get_any_name() for port in compiled.inputs]
        self.ran_as = ran_as(compiled)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self._request
        if self._static is not None and all(tuple(np.shape(feeds.get(k))) == v for k, v in self._static_shape.items()):
            request = self._static
        request.infer(feeds)
        # Copies: the request reuses its output buffers on the next run.
        return [request.get_output_tensor(i).data.copy() for i in range(self._outputs)]


# The properties runtime_settings writes, and the values each may take; a folder from elsewhere may
# name others (CACHE_DIR made `dlopt run` write cache blobs outside the folder): they are refused.
_PROPERTY_VALUES = {
    "INFERENCE_PRECISION_HINT": frozenset(_HINTS.values()) | {"f16"},
    "PERFORMANCE_HINT": frozenset({"LATENCY", "THROUGHPUT"}),
}
_COUNT_PROPERTIES = ("INFERENCE_NUM_THREADS", "NUM_STREAMS")


def checked_properties(settings: dict, source: str) -> tuple[str, dict]:
    """The device and compile_model properties of ``settings`` (runtime_config.json): only those dlopt
    writes, with thread and stream counts at most this host's cores."""
    device, properties = settings.get("device", DEVICE), settings.get("properties")
    if device != DEVICE:
        raise ConfigError(f"{source} names device {device!r}; dlopt artefacts run on {DEVICE} (fix it or compile "
                          f"again)")
    if not isinstance(properties, dict):
        raise ConfigError(f"{source}: properties must be a JSON object; fix it or compile again")
    checked = {}
    for key, value in properties.items():
        if key in _COUNT_PROPERTIES:
            checked[key] = threads_from_file(value, key=key, source=source)
        elif key in _PROPERTY_VALUES:
            if not isinstance(value, str) or value not in _PROPERTY_VALUES[key]:
                raise ConfigError(f"{source}: {key} {value!r} is not a value dlopt writes (one of "
                                  f"{', '.join(sorted(_PROPERTY_VALUES[key]))}); fix it or compile again")
            checked[key] = value
        else:
            raise ConfigError(f"{source} sets OpenVINO property {key!r}, which dlopt does not write; dlopt passes "
                              f"only {', '.join([*_PROPERTY_VALUES, *_COUNT_PROPERTIES])} (remove it, or compile "
                              f"again)")
    return device, checked


# -- the output README and Triton ---------------------------------------------------------------------

_PROPERTY = re.compile(r"[A-Z][A-Z0-9_]*")
_TRITON_PARAMETERS = ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")


class OpenVinoBackend(Backend):
    name, entry, settings_file, own_precisions = name, ENTRY, SETTINGS_FILE, OWN_PRECISIONS
    runtime_name, dlopt_extra = "OpenVINO", "openvino"
    plain_runtime = "dlopt.targets.openvino_plain:OpenVinoPlain"
    prefers_nncf = reduce_range_where_saturating = True

    def with_threads(self, settings: dict, threads: int) -> dict:
        return {**settings, "properties": {**settings.get("properties", {}), "INFERENCE_NUM_THREADS": threads}}

    def available(self) -> bool | str:
        # find_spec, not import: importing OpenVINO takes ~0.6 s and `dlopt targets` asks every backend.
        # A present but broken install surfaces as TargetUnavailable when the backend is first used.
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed; install dlopt[openvino]"
        return True

    def precisions(self, profile) -> tuple[str, ...]:
        # OpenVINO also runs on ARM CPUs, but dlopt does not target OpenVINO there yet; GPUs and
        # microcontrollers are other backends' job.  An empty tuple skips this backend.
        if profile.device is not DeviceKind.CPU or profile.arch != "x86_64":
            return ()
        offered = ("fp32", "fp16", "int8", "mixed")
        # bf16 only when the profile is this machine and its CPU has bf16 kernels (AMX, AVX512-BF16):
        # anywhere else the candidate could be neither verified nor timed.
        if profile.runs_here() and "BF16" in _core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"):
            offered += ("bf16",)
        return offered

    def supports(self, model) -> list[str]:
        """Ops OpenVINO's ONNX frontend has no conversion rule for (converted partially, so all are named).

        A model its converter cannot be trusted with (deep control flow, huge generated
        constants: dlopt.core.graph_facts) is refused before the converter sees it.
        """
        hazards = converter_hazards(model)
        if hazards:
            return hazards
        _, frontend = _onnx_frontend()
        producers = {out.name: op_label(node) for node in ir.traversal.RecursiveGraphIterator(model.graph)
                     for out in node.outputs}
        with tempfile.TemporaryDirectory(prefix="dlopt-ov-") as tmp:
            with _as_onnx_file(model, Path(tmp)) as path:
                try:
                    partial = frontend.convert_partially(frontend.load(str(path)))
                except Exception as exc:  # not an op problem: compile() reports the converter's message
                    logger.warning("OpenVINO's ONNX frontend cannot read the model: %s", _message(exc))
                    return []
                missing = _unconverted(partial, producers)
                if not missing:
                    return []
                # An op the frontend has a rule for but failed to convert (a Conv inside an If branch whose
                # input rank is unknown) is not an unsupported op: say why it failed.
                failed = _conversion_failures(frontend, path)
                return sorted(f"{op} (converter failed: {failed[op]})" if op in failed else op for op in missing)

    def runtime_version(self) -> str:
        from importlib import metadata

        return metadata.version("openvino")

    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int, shapes=None) -> Artifact:
        """Convert ``model`` to OpenVINO IR in ``workdir``; int8/mixed models arrive as QDQ ONNX."""
        if precision not in _HINTS:
            raise CompileError(f"openvino cannot build precision {precision!r}; it builds {', '.join(_HINTS)}")
        ov = _ov()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            with _as_onnx_file(model, workdir) as path:
                with _root_logger_kept():
                    converted = ov.convert_model(str(path))  # QuantizeLinear/DequantizeLinear -> FakeQuantize
                # save_model compresses weights to f16 by default: only the fp16 candidate asks for it.
                ov.save_model(converted, str(workdir / "model.xml"), compress_to_fp16=precision == "fp16")
        except Exception as exc:
            raise CompileError(f"OpenVINO could not convert the model: {_message(exc)}") from exc
        static = shapes if shapes and _symbolic_inputs(model) else None
        threads, _ = profile.threads_for(threads)  # the board's cores, not this host's
        settings = runtime_settings(precision, threads, static)
        (workdir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return Artifact(
            backend=name,
            precision=precision,
            folder=workdir,
            files=["model.xml", "model.bin", SETTINGS_FILE],
            entry="model.xml",
            settings=settings,
            # IR is portable across x86-64 CPUs: a CPU profile of this host's ISA can be verified here.
            loadable_here=profile.runs_here() or (profile.device is DeviceKind.CPU and profile.arch == host_arch()),
        )

    def load(self, artifact: Artifact) -> OpenVinoSession:
        settings = artifact.settings
        device, properties = checked_properties(settings, str(artifact.folder / SETTINGS_FILE))
        compiled = _core().compile_model(str(artifact.entry_path), device, properties)
        static, shape = None, settings.get("static_shape")
        if shape:
            model = _core().read_model(str(artifact.entry_path))
            try:
                model.reshape({k: list(v) for k, v in shape.items()})
                static = _core().compile_model(model, device, properties)
            except Exception as exc:  # a model that cannot take the shape runs dynamic, as before
                logger.debug("OpenVINO could not compile %s for %s: %s", artifact.entry_path, shape, first_line(exc))
        return OpenVinoSession(compiled, static, shape)

    def install_lines(self, shipped: list, text) -> list[str]:
        del text
        versions = {str(s.settings.get("openvino_version", "")).split("-", 1)[0] for s in shipped}
        return [f"OpenVINO ({', '.join(s.key for s in shipped)}): `pip install openvino"
                f"{'==' + snippets.version(v) if snippets.version(v) else ''} numpy`" for v in sorted(versions)]

    def plain_code(self, s, feeds: str, arch: str) -> list[str]:
        del arch
        settings = s.settings
        properties = {k: v for k, v in (settings.get("properties") or {}).items()
                      if isinstance(k, str) and _PROPERTY.fullmatch(k) and isinstance(v, (str, int, float, bool))}
        code = ["import numpy as np", "import openvino as ov", "core = ov.Core()",
                f"model = core.read_model({s.path('model.xml')!r})"]
        static = settings.get("static_shape")
        if isinstance(static, dict) and static:
            code.append(f"model.reshape({ {str(k): [int(d) for d in v] for k, v in static.items()}!r})"
                        "  # the static shape it was timed at runs faster")
        code += [f"compiled = core.compile_model(model, {str(settings.get('device', 'CPU'))!r}, {properties!r})",
                 f"outs = list(compiled({feeds}).values())"]
        return code

    def fill_triton(self, config, artifact: Artifact, plain_file) -> str:
        """Triton's openvino backend with the plugin properties (threads, streams, hint) as parameters."""
        del plain_file
        config.backend = "openvino"
        properties = artifact.settings.get("properties") or {}
        for key in _TRITON_PARAMETERS:
            if properties.get(key) is not None:
                config.parameters[key].string_value = str(properties[key])
        config.default_model_filename = "model.xml"
        return "KIND_CPU"


BACKEND = OpenVinoBackend()
