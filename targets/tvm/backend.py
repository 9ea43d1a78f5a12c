"""Apache TVM backend: ONNX -> Relax -> one shared library with the weights inside.

CPU profiles get a library for the profile's CPU (``-mcpu``; aarch64 with NEON,
linked by the profile's cross compiler).  GPU profiles get a host library whose
CUDA kernels nvcc compiles here into a fatbin for the profile's ``cuda_arch``,
so the device needs no compiler; without nvcc (or for an arch it dropped) the
kernels ship as source, compiled on the device at load.  Only libraries for a
CPU this machine can run are loaded and verified here.

Untuned: the default Relax pipeline (dlight schedules on GPUs), no tuning
database.  Shapes are static; symbolic input dims are compiled as 1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx_ir as ir

from dlopt.core.errors import CompileError, DataError, DloptError, TargetUnavailable, first_line
from dlopt.core.graph_facts import converter_hazards, op_label
from dlopt.core.profiles import host_arch, DeviceKind
from dlopt.core.scoped_env import environ as _environ
from dlopt.targets._native_output import native_output_logged
from dlopt.targets.base import Artifact, Backend
from dlopt.targets.tvm import facts, import_tvm

logger = logging.getLogger(__name__)
name = "tvm"
LIBRARY = "model.so"
BUILD_FILE = SETTINGS_FILE = "tvm_build.json"
ENTRY = LIBRARY
_FORMS = {"x86_64": "x86_64 shared library", "aarch64": "aarch64 shared library (NEON)"}
# ORT contrib ops the Relax ONNX frontend converts; it ignores domains, so no others may reach it.
_CONTRIB = frozenset({"Attention", "BiasGelu", "EmbedLayerNormalization", "FastGelu", "Gelu",
                      "SkipLayerNormalization", "QuantizeLinear", "DequantizeLinear"})
_LIBRARY_BIN = "__tvm_ffi__library_bin"  # the symbol TVM's loader reads imported modules from
_CUDA_SOURCE_FMT = struct.pack("<Q", 4) + b"cuda"  # start of a CUDA module payload holding source
_BIG_CORES, _ONE_CORE_PER_THREAD = 1, -2  # TVM's ThreadGroup::AffinityMode kBig, kSpecifyOneCorePerThread


@lru_cache(maxsize=1)
def _converters() -> frozenset[tuple[str, str]]:
    try:
        import_tvm()
        from tvm.relax.frontend.onnx import onnx_frontend
    except Exception as exc:  # ImportError, or a missing shared library under it
        raise TargetUnavailable(f"apache-tvm is installed but does not import ({first_line(exc)}); "
                                f"reinstall dlopt[tvm]") from exc

    ops = set(onnx_frontend._get_convert_map()) | {"If"}  # If is converted outside the map
    return frozenset({("ai.onnx", op) for op in ops} | {("com.microsoft", op) for op in ops & _CONTRIB})


def _linker(profile):
    """(fcompile for export_library, its name); TargetUnavailable when the cross compiler is missing."""
    import_tvm()
    from tvm.support import cc

    if profile.arch == host_arch():
        return None, "host cc"
    missing = profile.cross_toolchain()  # the answer `dlopt targets` gives
    if missing is not True:
        raise TargetUnavailable(missing)
    return cc.cross_compiler(profile.cross_compiler), profile.cross_compiler


def input_specs(model, shapes: dict | None = None) -> list[dict]:
    """Static shapes for the build: a symbolic first dim is a batch the session serves sample by
    sample (built as 1); other symbolic dims (a sequence length) take the declared timing shape's
    size, else 1."""
    def dims(v) -> list[int]:
        declared = (shapes or {}).get(v.name)
        return [d if isinstance(d, int) else
                (declared[i] if i and declared is not None and i < len(declared) else 1)
                for i, d in enumerate(v.shape or ())]

    return [{"name": v.name, "dtype": v.dtype.numpy().name, "shape": dims(v),
             "dynamic_batch": bool(v.shape) and not isinstance(v.shape[0], int)}
            for v in model.graph.inputs if v.name not in model.graph.initializers]


def static_graph(model, inputs: list[dict]):
    """A copy of ``model`` at the build's static input shapes, its shape arithmetic folded.

    Why: TVM 0.27's Relax ONNX frontend fails on the shape subgraphs transformer exports carry
    (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``, masks built from ``Range`` over the
    sequence length and a scalar ``ConstantOfShape``), even with static input shapes: its Gather
    takes ``shape_of`` of a bound ``R.Shape`` ("shape_of expects a tensor input"), ConstantOfShape
    of a 0-d shape fails in ``broadcast_to``, and symbolic extents reach Python ``and`` ("Cannot
    use and / or / not operator to Expr", all-MiniLM-L6-v2).  The library is built for static
    shapes anyway, so fixing the inputs to them and folding makes every such subgraph a constant.
    """
    from onnx_ir.passes.common import InlinePass, LiftConstantsToInitializersPass

    from dlopt.passes.fix_input_shapes import FixInputShapesPass
    from dlopt.passes.fold_shape_arithmetic import FoldShapeArithmeticPass

    return ir.passes.Sequential(
        InlinePass(),  # the frontend knows no model-local functions
        FixInputShapesPass(shapes={i["name"]: i["shape"] for i in inputs}),
        FoldShapeArithmeticPass(),
        # nor Constants without a tensor ``value``
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
    )(model.clone()).model


def relax_module(model, inputs: list[dict]):
    return _import(static_graph(model, inputs), inputs)


def _import(static, inputs: list[dict]):
    """The Relax module of ``static``, a model :func:`static_graph` made."""
    import_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.serde.serialize_model(static)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # the frontend prints while failing
            return from_onnx(proto, shape_dict={i["name"]: i["shape"] for i in inputs},
                             dtype_dict={i["name"]: i["dtype"] for i in inputs}, keep_params_in_input=False)
    finally:
        if printed.getvalue().strip():
            logger.debug("TVM's ONNX frontend printed:\n%s", printed.getvalue().rstrip())


def _cuda_kept_as_source():
    """Where a driver is present TVM would JIT kernels at build time via NVRTC's Python
    bindings (often absent); keep them as source and run nvcc ourselves."""
    return _environ(TVM_COMPILE_FORCE_FALLBACK="1")


def _build(static, profile, library: Path, inputs: list[dict], threads: int, db=None) -> dict:
    """Build ``library`` from ``static`` (:func:`static_graph`'s) for ``profile`` (with the tuned
    schedules of ``db``, a TuningDatabase); returns what the build record says about it."""
    tvm = import_tvm()
    from tvm import relax

    from dlopt.targets.tvm.tuning import tuning_target

    host = tuning_target(profile, threads)  # the target a tuning database is keyed by
    fcompile, linker = _linker(profile)
    gpu = profile.device is DeviceKind.GPU
    target = (tvm.target.Target({"kind": "cuda", "arch": profile.cuda_arch}, host=host) if gpu
              else tvm.target.Target(host))
    facts = {"target": json.loads(str(target)), "host": host, "linker": linker,
             "form": _FORMS.get(profile.arch, f"{profile.arch} shared library"),
             "device_needs": "the TVM runtime (apache-tvm) for this CPU"}
    mod = _import(static, inputs)
    pipeline = relax.get_default_pipeline(target)
    facts["tuning"] = "untuned (default Relax pipeline, no tuning database)"
    if db is not None and not gpu and db.meta() is not None:
        from dlopt.targets.tvm import tuning as tvm_tuning

        mod, tuned, tasks = tvm_tuning.apply_database(mod, host, db)
        pipeline = tvm_tuning.lowering_pipeline(target)
        facts.update(tuning=f"{tuned} of {tasks} tasks tuned from {db.path} ({db.record_count()} trials)",
                     tuning_db=str(db.path), tuned_tasks=tuned, tasks=tasks)
    options = {"fcompile": fcompile} if fcompile else {}
    with target, _cuda_kept_as_source():  # nvcc takes the arch from the current target
        executable = relax.build(mod, target=target, relax_pipeline=pipeline)
        if gpu:
            facts.update(_embed_kernels(executable, profile, options))
        executable.mod.export_library(str(library), **options)
    return facts


def _embed_kernels(executable, profile, options: dict) -> dict:
    """nvcc the kernels into a fatbin packed into the library, or say why they stay source."""
    import_tvm()
    from tvm.support import nvcc

    sources = [m.inspect_source("cuda") for m in _modules(executable.mod) if m.kind == "cuda"]
    if len(sources) != 1:
        raise CompileError(f"expected one CUDA module from TVM, got {len(sources)}")
    source, sm = str(sources[0]), profile.cuda_arch.removeprefix("sm_")
    release = None
    if shutil.which("nvcc"):
        version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        release = version.rpartition("release ")[2].split(",")[0] or "unknown"
    try:
        if release is None:
            raise RuntimeError("nvcc not found")
        # SASS for the arch plus its PTX, which newer GPUs JIT.
        arch = ["-gencode", f"arch=compute_{sm},code=[sm_{sm},compute_{sm}]"]
        fatbin = bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))
    except Exception as exc:  # no nvcc, or it rejects the arch (CUDA 13 dropped sm_53): ship the source
        reason = str(exc).rpartition("Compilation error:")[2]  # after the source it echoes
        return {"form": f"{profile.arch} host + CUDA source (compiled on device at load)",
                "fatbin_error": first_line(RuntimeError(reason.strip() or str(exc))),
                "device_needs": "TVM with CUDA and nvcc (or NVRTC's Python bindings) on the device"}
    options["fpack_imports"] = _packer(source.encode(), fatbin)
    return {"form": f"{profile.arch} host + CUDA fatbin {profile.cuda_arch}", "nvcc": release,
            "fatbin_bytes": len(fatbin),
            "device_needs": f"the TVM runtime with CUDA (this wheel links libcudart.so.13) and an NVIDIA "
                            f"driver for CUDA {release}"}


def _modules(module):
    yield module
    for child in module.imports:
        yield from _modules(child)


def _with_fatbin(blob: bytes, source: bytes, fatbin: bytes) -> bytes:
    """TVM's packed-module blob with the CUDA module's ``source`` replaced by ``fatbin``.

    Layout (tvm-ffi): u64 size, import tree (two u64 vectors), then per module its
    kind string and, except for ``_lib``, a u64-sized payload; a CUDA payload is
    fmt string, function map, code bytes.  TVM's runtime hands code of any fmt
    but "cuda" to cuModuleLoadData, which takes fatbins.
    """
    def u64(at: int) -> int:
        return struct.unpack_from("<Q", blob, at)[0]

    at = 8
    for _ in range(2):
        at += 8 + 8 * u64(at)
    out, replaced = bytearray(blob[:at]), 0
    while at < len(blob):
        end = at + 8 + u64(at)
        kind = blob[at + 8:end]
        out += blob[at:end]
        at = end
        if kind == b"_lib":
            continue
        payload = blob[at + 8:at + 8 + u64(at)]
        at += 8 + len(payload)
        code_at = len(payload) - 8 - len(source)
        if (kind == b"cuda" and payload.startswith(_CUDA_SOURCE_FMT)
                and payload[code_at:] == struct.pack("<Q", len(source)) + source):
            fmap = payload[len(_CUDA_SOURCE_FMT):code_at]
            payload = b"".join([struct.pack("<Q", 6), b"fatbin", fmap, struct.pack("<Q", len(fatbin)), fatbin])
            replaced += 1
        out += struct.pack("<Q", len(payload)) + payload
    if replaced != 1:
        raise CompileError("unexpected layout of TVM's packed CUDA module; cannot embed the fatbin")
    struct.pack_into("<Q", out, 0, len(out) - 8)
    return bytes(out)


def _packer(source: bytes, fatbin: bytes):
    """An ``fpack_imports`` for export_library: TVM's blob with the fatbin, as assembly."""

    def pack(module, is_system_lib, prefix, workspace_dir) -> str:
        import_tvm()
        from tvm.runtime import _ffi_api

        if is_system_lib or prefix:
            raise CompileError("TVM system-library builds cannot embed a fatbin")
        data, asm = Path(workspace_dir) / "devc.bin", Path(workspace_dir) / "devc.S"
        data.write_bytes(_with_fatbin(_ffi_api.ModulePackImportsToTensor(module).numpy().tobytes(),
                                      source, fatbin))
        asm.write_text(f'  .section .rodata\n  .balign 16\n  .globl {_LIBRARY_BIN}\n'  # .incbin: no C array
                       f'  .type {_LIBRARY_BIN}, %object\n{_LIBRARY_BIN}:\n  .incbin "{data}"\n'
                       f'  .size {_LIBRARY_BIN}, . - {_LIBRARY_BIN}\n')
        return str(asm)

    return pack


class TvmSession:
    """A Relax VM over the library, running ``main`` on the inputs in model order.

    ``threads`` is the size of TVM's thread pool in effect, which may be smaller than
    the one asked for: TVM keeps one pool per calling thread, sized the first time,
    and it can only shrink afterwards.  The pool is configured for each thread that
    runs the session through TVM's own API rather than the process-wide
    TVM_NUM_THREADS, and the thread's CPU affinity, which TVM narrows while it pins
    its workers, is put back.
    """

    def __init__(self, library: Path, settings: dict, *, source: str = SETTINGS_FILE) -> None:
        tvm = import_tvm()
        from tvm.runtime.vm import VirtualMachine  # = relax.VirtualMachine, without the compiler

        from dlopt.targets.ort import threads_from_file

        self._asked = threads_from_file(settings.get("threads") or 0, key="threads", source=source)
        self._tensor = tvm.runtime.tensor
        self._inputs = settings["inputs"]
        self.input_names = [i["name"] for i in self._inputs]
        self._configured: set[int] = set()
        with native_output_logged("loading the library"):
            self._main = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())["main"]
            self._configure_pool()
        self.threads = int(tvm.get_global_func("runtime.NumThreads")())

    def _configure_pool(self) -> None:
        tvm = import_tvm()

        self._configured.add(threading.get_ident())
        if not self._asked:
            return
        configure = tvm.get_global_func("runtime.config_threadpool")
        if not hasattr(os, "sched_getaffinity"):  # no CPU list to give (macOS): TVM's default cap applies
            configure(_BIG_CORES, self._asked)
            return
        allowed = os.sched_getaffinity(0)
        try:
            # One worker per CPU on the first ``threads`` allowed ones (TVM's default pins so too);
            # the CPU list is also what caps this thread's parallelism, in place of TVM_NUM_THREADS.
            configure(_ONE_CORE_PER_THREAD, self._asked, [str(c) for c in sorted(allowed)[:self._asked]])
        finally:
            os.sched_setaffinity(0, allowed)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if threading.get_ident() not in self._configured:
            with native_output_logged("configuring its thread pool"):
                self._configure_pool()
        parts = [self._run(feed) for feed in per_call(self._inputs, feeds)]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(outs, axis=0) for outs in zip(*parts)]  # a batch-1 library, sample by sample

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return _flatten(self._main(*arguments(self._inputs, feeds, self._tensor)))


def per_call(inputs: list[dict], feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``feeds`` as calls of the library: one, or one per sample when a library built for batch 1
    (every input ``dynamic_batch``) gets a batch."""
    batched = [s for s in inputs if s.get("dynamic_batch")]
    if batched and len(inputs) == len(batched):
        sizes = {len(feeds[s["name"]]) for s in batched}
        if len(sizes) == 1 and (n := sizes.pop()) != 1:
            return [{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)]
    return [feeds]


def arguments(inputs: list[dict], feeds: dict[str, np.ndarray], make_tensor) -> list:
    """The library's arguments in model order, each checked against the shape it was built for."""
    args = []
    for spec in inputs:
        # np.ascontiguousarray would give a 0-d input (a Clip bound) shape [1]
        array = np.require(np.asarray(feeds[spec["name"]], dtype=spec["dtype"]), requirements="C")
        if list(array.shape) != spec["shape"]:
            raise DataError(f"input {spec['name']!r} has shape {list(array.shape)}; this TVM library was "
                            f"built for {spec['shape']}")
        args.append(make_tensor(array))
    return args


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [array for item in value for array in _flatten(item)]


def tuning_database(model, profile, threads: int, shapes, root: Path):
    """The TuningDatabase for this model (as the backend receives it) and ``profile``'s target."""
    from dlopt.targets.tvm.tuning import TuningDatabase, model_digest, tuning_target

    return TuningDatabase(Path(root), model_digest(model, shapes), tuning_target(profile, threads))


class TvmBackend(Backend):
    name, entry, settings_file = name, ENTRY, SETTINGS_FILE
    runtime_name, dlopt_extra, tunable, runs_over_rpc = "TVM", "tvm", True, True
    plain_runtime = "dlopt.targets.tvm.plain:TvmPlain"
    # Relax builds for static shapes and takes shape-like operands only as constants.  Its ONNX frontend takes
    # ONNX Attention for ORT's contrib Attention, returns only Y of LayerNormalization and fails
    # RMSNormalization on axis 0 (ONNX backend tests, onnx 1.23): their function bodies run right.
    compiles_per_input_shapes = True
    expand_function_ops = frozenset({"Attention", "LayerNormalization", "RMSNormalization"})
    runs_with_dlopt, library_cpu = staticmethod(facts.runs_with_dlopt), staticmethod(facts.library_cpu)
    install_lines, plain_code = staticmethod(facts.install_lines), staticmethod(facts.plain_code)

    def check_runs_here(self, artifact: Artifact) -> None:
        facts.check_runs_here(artifact)
        super().check_runs_here(artifact)

    def with_threads(self, settings: dict, threads: int) -> dict:
        return {**settings, "threads": threads}

    def build_needs(self, profile) -> bool | str:
        # the library is linked for the profile's CPU (a GPU profile's host code too) with its cross compiler
        return profile.cross_toolchain()

    def build_limits(self, profile) -> str | None:
        if profile.device is DeviceKind.GPU and profile.cuda_arch and not shutil.which("nvcc"):
            return "CUDA kernels ship as source, compiled on the device at load: nvcc missing (install the CUDA toolkit)"
        return None

    def built_inputs(self, settings: dict) -> list[dict] | None:
        return settings.get("inputs")

    @lru_cache(maxsize=1)
    def available(self) -> bool | str:
        from importlib import metadata

        # find_spec, not import: importing TVM costs ~400 MB and a second, and a model every TVM check
        # refuses should not pay for it.  A broken install surfaces when the backend is first used.
        try:
            ffi_version = metadata.version("apache-tvm-ffi")
        except metadata.PackageNotFoundError:
            return "apache-tvm is not installed; install dlopt[tvm]"
        if importlib.util.find_spec("tvm") is None:
            return "apache-tvm is not installed; install dlopt[tvm]"
        if ffi_version.startswith("0.1.15"):
            return f"apache-tvm-ffi {ffi_version} crashes when TVM writes JSON; install apache-tvm-ffi==0.1.14.post1"
        return True

    def precisions(self, profile) -> tuple[str, ...]:
        return ("fp32",) if profile.device in (DeviceKind.CPU, DeviceKind.GPU) else ()

    def supports(self, model) -> list[str]:
        hazards = converter_hazards(model)  # it would fold a huge generated constant into the library
        if hazards:
            return hazards
        converters = _converters()
        functions = {(f.domain, f.name) for f in model.functions.values()}  # inlined before conversion
        missing = set()
        for graph in (model.graph, *model.functions.values()):
            for node in ir.traversal.RecursiveGraphIterator(graph):
                domain = node.domain or "ai.onnx"
                if (domain, node.op_type) not in converters and (node.domain, node.op_type) not in functions:
                    missing.add(op_label(node))
        return sorted(missing)

    def runtime_version(self) -> str:
        from importlib import metadata

        tvm = import_tvm()

        return f"tvm {tvm.__version__}, apache-tvm-ffi {metadata.version('apache-tvm-ffi')}"

    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int, shapes=None,  # noqa: A001
                tuning=None) -> Artifact:
        """``tuning``: the TuningDatabase of this model and target (``build_options`` finds it); when it
        holds records, they schedule the kernels (the build record says how many)."""
        tvm = import_tvm()

        if precision not in self.precisions(profile):
            raise CompileError(f"TVM builds {', '.join(self.precisions(profile)) or 'nothing'} for {profile.name}, "
                               f"not {precision}")
        workdir.mkdir(parents=True, exist_ok=True)
        inputs = input_specs(model, shapes)
        threads_asked = threads
        threads, threads_from = profile.threads_for(threads)  # the board's cores, not this host's
        try:
            static = static_graph(model, inputs)  # Python, whose logs are not TVM's native output
            with native_output_logged(f"building for {profile.name}"):
                facts = _build(static, profile, workdir / LIBRARY, inputs, threads_asked, tuning)
        except DloptError:
            raise
        except Exception as exc:  # TVM raises its own errors and plain Python ones alike
            raise CompileError(f"TVM could not build {profile.name}: {first_line(exc)}") from exc
        settings = {**facts, "tvm_version": tvm.__version__, "inputs": inputs,
                    "outputs": [v.name for v in model.graph.outputs], "threads": threads, "threads_from": threads_from}
        (workdir / BUILD_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return Artifact(backend=name, precision=precision, folder=workdir, files=[LIBRARY, BUILD_FILE],
                        entry=LIBRARY, loadable_here=profile.device is DeviceKind.CPU and profile.runs_here(),
                        settings=settings)

    def load(self, artifact: Artifact) -> TvmSession:
        return TvmSession(artifact.entry_path, artifact.settings, source=str(artifact.folder / SETTINGS_FILE))

    options_section = "tvm"

    def build_options(self, options, model, profile, shapes, *, threads: int, calibration=()) -> dict:
        """What compile() takes besides the model: the matching tuning database, and (for the artefact
        cache key only, never passed on) its state, so tuning more rebuilds."""
        from dlopt.targets.tvm.tuning import default_root

        if options.tuning_db is False or profile.device is not DeviceKind.CPU:
            return {}
        root = Path(options.tuning_db) if isinstance(options.tuning_db, (str, os.PathLike)) else default_root()
        try:
            db = tuning_database(model, profile, threads, shapes, root)
            state = f"{db.path}:{db.record_count()}" if db.meta() is not None else "none"
        except DloptError as exc:  # an unusable database folder: built untuned, and said why
            logger.warning("tuning database not used: %s", exc)
            return {}
        return {"tuning": db, "cache:tuning": state}

    def load_remote(self, artifact: Artifact, device, *, threads: int | None = None):
        from dlopt.targets.tvm.rpc import remote_session

        return remote_session(device, artifact.entry_path, artifact.settings, threads=threads)


BACKEND = TvmBackend()
