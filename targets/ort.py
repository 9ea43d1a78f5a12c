"""ONNX Runtime backend: the optimised ONNX model plus the session options to run it."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from dlopt.core.config import machine_cores
from dlopt.core.errors import ConfigError
from dlopt.core.graph_facts import GENERATED_CONSTANT_LIMIT, largest_generated_constant, op_label
from dlopt.core.model_io import save_ir
from dlopt.core.ort_sessions import CONFIG_ENTRIES, apply_config_entries
from dlopt.core.profiles import DeviceKind
from dlopt.passes.ort_fuse_activation import FuseActivationForOrtPass
from dlopt.passes.unshare_integer_weights import UnshareIntegerWeightsPass
from dlopt.targets import snippets
from dlopt.targets.base import Artifact, Backend

name = "ort"
ENTRY = "model.onnx"
SETTINGS_FILE = "session_options.json"


@lru_cache(maxsize=1)
def _cpu_kernels() -> frozenset[tuple[str, str]]:
    from onnxruntime.capi import _pybind_state

    return frozenset(
        (k.domain or "ai.onnx", k.op_name)
        for k in _pybind_state.get_all_opkernel_def()
        if k.provider == "CPUExecutionProvider"
    )


# Ops ONNX Runtime resolves while loading a graph instead of with a kernel.
_LOAD_TIME_OPS = frozenset({("ai.onnx", "Constant")})


def _expands_to_function(domain: str, op_type: str) -> bool:
    """ONNX ops defined by a function body (CastLike, ...): ORT inlines them when it has no kernel."""
    import onnx

    if not onnx.defs.has(op_type, "" if domain == "ai.onnx" else domain):
        return False
    schema = onnx.defs.get_schema(op_type, domain="" if domain == "ai.onnx" else domain)
    return schema.has_function or schema.has_context_dependent_function


CPU_PROVIDERS = ("CPUExecutionProvider",)
# NVIDIA boards: TensorRT first (ORT hands it the subgraphs it can build), CUDA for the rest.
NVIDIA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def providers_for(profile) -> list[str]:
    """Execution providers in the order the device should try them."""
    return list(NVIDIA_PROVIDERS if profile.device is DeviceKind.GPU and profile.cuda_arch else CPU_PROVIDERS)


def session_settings(threads: int, model=None, *, providers=CPU_PROVIDERS, threads_from: str | None = None) -> dict:
    """Session settings; for ``model`` (an onnx_ir Model) that generates a huge constant,
    ORT's own constant folding is switched off: it would materialise it at session start."""
    settings = {
        "providers": list(providers),
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "intra_op_num_threads": threads,
        **({"threads_from": threads_from} if threads_from else {}),
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "config_entries": dict(CONFIG_ENTRIES),
        "onnxruntime_version": ort.__version__,
    }
    if model is not None:
        if largest_generated_constant(model) > GENERATED_CONSTANT_LIMIT:
            # nor should its arena keep that tensor's memory between runs: timing holds sessions side by side
            settings.update(disabled_optimizers=["ConstantFolding"], enable_cpu_mem_arena=False)
    return settings


def _usable_cores() -> int:
    return machine_cores()


def threads_from_file(value, *, key: str, source: str) -> int:
    """A thread or stream count read from an artefact's settings file, at most this host's cores
    (0 stays 0: the runtime's default).  A folder from elsewhere may say 3000: ORT started 3000
    inter-op threads and took minutes to load."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: {key} must be a whole number of threads (0 for the runtime's default), "
                          f"got {value!r}; fix it or compile again")
    return min(value, _usable_cores())


def providers_here(wanted) -> list[str]:
    """``wanted`` less the providers this ONNX Runtime lacks, in order; the CPU one at least."""
    available = set(ort.get_available_providers())
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


class OrtSession:
    """A session over the settings an artefact shipped with, as far as this host can honour them.

    Settings written for a device (a Jetson's TensorRT provider, a board's core count) are
    what the device runs; here the session takes the providers this ONNX Runtime has, in the
    same order, and at most this host's cores (more threads than cores only thrash).
    """

    def __init__(self, model_path: str | os.PathLike | bytes, settings: dict, *, source: str = SETTINGS_FILE) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = _enum(ort.GraphOptimizationLevel, settings, "graph_optimization_level",
                                                 "ORT_ENABLE_ALL", source)
        for key, default in (("intra_op_num_threads", 0), ("inter_op_num_threads", 1)):
            setattr(options, key, threads_from_file(settings.get(key, default), key=key, source=source))
        options.execution_mode = _enum(ort.ExecutionMode, settings, "execution_mode", "ORT_SEQUENTIAL", source)
        options.enable_cpu_mem_arena = bool(settings.get("enable_cpu_mem_arena", True))
        options.log_severity_level = 4  # failures raise with their message; no coloured log line on stderr
        _check_config_entries(settings, source)
        apply_config_entries(options, settings)
        target = model_path if isinstance(model_path, bytes) else str(model_path)
        self._session = ort.InferenceSession(
            target, options, providers=providers_here(settings.get("providers", CPU_PROVIDERS)),
            disabled_optimizers=settings.get("disabled_optimizers") or None,
        )
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> list[np.ndarray]:
        return self._session.run(None, feeds, options)


def _enum(kind, settings: dict, key: str, default: str, source: str):
    value = settings.get(key, default)
    if not (isinstance(value, str) and value.isupper() and isinstance(getattr(kind, value, None), kind)):
        raise ConfigError(f"{source}: {key} {value!r} is not one of ONNX Runtime's {kind.__name__} names "
                          f"(such as {default}); fix it or compile again")
    return getattr(kind, value)


def _check_config_entries(settings: dict, source: str) -> None:
    """Only the session config entries dlopt writes: others can make ORT write files (EP context models)."""
    entries = settings.get("config_entries", CONFIG_ENTRIES)
    if not isinstance(entries, dict):
        raise ConfigError(f"{source}: config_entries must be a JSON object; fix it or compile again")
    foreign = sorted(set(entries) - set(CONFIG_ENTRIES))
    if foreign:
        raise ConfigError(f"{source} sets ONNX Runtime config entry {foreign[0]!r}, which dlopt does not write; "
                          f"dlopt passes only {', '.join(CONFIG_ENTRIES)} (remove it, or compile again)")


# -- the output README and Triton ---------------------------------------------------------------------

_GPU = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
_ENUM = re.compile(r"ORT_[A-Z_]+")
_ARCH_NAME = re.compile(r"[^A-Za-z0-9_.-]")
TRITON_TRT_PRECISION = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}  # Triton's TensorRT precision_mode


def _x64_comment(arch: str) -> str:
    if arch in ("x86_64", "amd64", ""):
        return "  # exact int8 kernels on x86 CPUs without VNNI"
    return f"  # read by x86-64 builds only; ONNX Runtime on {_ARCH_NAME.sub('?', arch)} ignores it"


def _enum_name(value, default: str) -> str:
    return value if isinstance(value, str) and _ENUM.fullmatch(value) else default


class OrtBackend(Backend):
    name, entry, settings_file = name, ENTRY, SETTINGS_FILE
    runtime_name = "ONNX Runtime"
    plain_runtime = "dlopt.targets.ort_plain:OrtPlain"

    def with_threads(self, settings: dict, threads: int) -> dict:
        return {**settings, "intra_op_num_threads": threads}

    # all-MiniLM-L6-v2 on ORT 1.32 CPU, 8x64, 2 threads: FP32 49.9 ms, dynamic per-channel INT8
    # 29.7 ms, static QDQ (smoothed, 9 of 96 nodes kept float to meet the budget) 41.2 ms: dynamic
    # first, static only when dynamic misses the budget
    static_int8_for_transformers = False

    def available(self) -> bool | str:
        return True  # a core dependency

    def runtime_version(self) -> str:
        return ort.__version__

    def precisions(self, profile) -> tuple[str, ...]:
        del profile  # the CPU provider runs every precision dlopt builds (fp16 behind Casts where needed)
        return ("fp32", "fp16", "int8", "mixed", "int8-dynamic")

    def supports(self, model) -> list[str]:
        kernels = _cpu_kernels() | _LOAD_TIME_OPS
        functions = {(f.domain, f.name) for f in model.functions.values()}
        missing = set()
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            domain = node.domain or "ai.onnx"
            if ((domain, node.op_type) not in kernels and (node.domain, node.op_type) not in functions
                    and not _expands_to_function(domain, node.op_type)):
                missing.add(op_label(node))
        return sorted(missing)

    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int, shapes=None) -> Artifact:
        del shapes  # ORT artefacts are portable ONNX with their symbolic dims
        workdir.mkdir(parents=True, exist_ok=True)
        files = save_ir(model, workdir / "model.onnx")
        threads, threads_from = profile.threads_for(threads)
        settings = session_settings(threads, model, providers=providers_for(profile), threads_from=threads_from)
        (workdir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return Artifact(
            backend=name,
            precision=precision,
            folder=workdir,
            files=[f.name for f in files] + [SETTINGS_FILE],
            entry="model.onnx",
            settings=settings,
        )

    def load(self, artifact: Artifact, *, threads: int | None = None) -> OrtSession:
        """The artefact's session; ``threads`` replaces the count it shipped with (a board's cores)."""
        settings = artifact.settings if threads is None else {**artifact.settings, "intra_op_num_threads": threads}
        return OrtSession(artifact.entry_path, settings, source=str(artifact.folder / SETTINGS_FILE))

    def lowering_passes(self, precision: str) -> list:
        """ORT's fused contrib ops are float32 only, and on QDQ models ORT does its own fusions; integer ops
        of a model ORT quantised already get their own constants (UnshareIntegerWeightsPass)."""
        return [FuseActivationForOrtPass()] * (precision == "fp32") + [UnshareIntegerWeightsPass()]

    def install_lines(self, shipped: list, text) -> list[str]:
        del text
        lines = []
        for version in dict.fromkeys(s.settings.get("onnxruntime_version") for s in shipped):
            ours = [s for s in shipped if s.settings.get("onnxruntime_version") == version]
            gpu = any(_GPU & set(s.settings.get("providers") or []) for s in ours)
            pinned = f"=={snippets.version(version)}" if snippets.version(version) else ""
            package = ("onnxruntime-gpu" if gpu else "onnxruntime") + pinned
            why = (" (the TensorRT and CUDA providers the sessions ask for first; a provider the build lacks is "
                   "skipped)" if gpu else "")
            lines.append(f"ONNX Runtime ({', '.join(s.key for s in ours)}): `pip install {package} numpy`{why}")
        return lines

    def plain_code(self, s, feeds: str, arch: str) -> list[str]:
        settings = s.settings
        level = _enum_name(settings.get("graph_optimization_level"), "ORT_ENABLE_ALL")
        mode = _enum_name(settings.get("execution_mode"), "ORT_SEQUENTIAL")
        providers = [p for p in settings.get("providers") or ["CPUExecutionProvider"] if isinstance(p, str)]
        disabled = [d for d in settings.get("disabled_optimizers") or [] if isinstance(d, str)]
        code = ["import numpy as np", "import onnxruntime as ort",
                "options = ort.SessionOptions()  # as session_options.json",
                f"options.intra_op_num_threads = {int(settings.get('intra_op_num_threads', 0))}",
                f"options.inter_op_num_threads = {int(settings.get('inter_op_num_threads', 1))}",
                f"options.execution_mode = ort.ExecutionMode.{mode}",
                f"options.graph_optimization_level = ort.GraphOptimizationLevel.{level}"]
        if settings.get("enable_cpu_mem_arena") is False:
            code.append("options.enable_cpu_mem_arena = False")
        entries = settings.get("config_entries")
        for key, value in (entries.items() if isinstance(entries, dict) else ()):
            code.append(f"options.add_session_config_entry({str(key)!r}, {str(value)!r})"
                        + (_x64_comment(arch) if key == "session.x64quantprecision" else ""))
        code += [f"providers = [p for p in {providers!r} if p in ort.get_available_providers()]",
                 f"session = ort.InferenceSession({s.path('model.onnx')!r}, options, providers=providers"
                 + (f", disabled_optimizers={disabled!r})" if disabled else ")"),
                 f"outs = session.run(None, {feeds})"]
        return code

    def fill_triton(self, config, artifact: Artifact, plain_file) -> str:
        """Triton's onnxruntime backend with the compile's thread settings; TensorRT or OpenVINO accelerators
        where the session ships with those providers."""
        del plain_file
        settings = artifact.settings
        config.platform, config.backend = "onnxruntime_onnx", "onnxruntime"
        providers = list(settings.get("providers") or [])
        for key, ours in (("intra_op_thread_count", "intra_op_num_threads"),
                          ("inter_op_thread_count", "inter_op_num_threads")):
            if isinstance(settings.get(ours), int):
                config.parameters[key].string_value = str(settings[ours])
        if settings.get("execution_mode"):
            config.parameters["execution_mode"].string_value = str(1 if settings["execution_mode"] == "ORT_PARALLEL"
                                                                   else 0)
        accelerators = config.optimization.execution_accelerators
        if "TensorrtExecutionProvider" in providers:
            trt = accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = TRITON_TRT_PRECISION.get(artifact.precision, "FP32")
        if "OpenVINOExecutionProvider" in providers:
            accelerators.cpu_execution_accelerator.add(name="openvino")
        config.default_model_filename = "model.onnx"
        return "KIND_GPU" if any(p in providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")) \
            else "KIND_CPU"


BACKEND = OrtBackend()
