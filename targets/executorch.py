"""ExecuTorch backend: the PyTorch module lowered to XNNPACK as a ``.pte`` program, fp32 or INT8.

ExecuTorch builds from the PyTorch module itself (``torch.export``), never from the ONNX file: a
compile given a module (``dlopt.compile(module, example=x)``, or an .onnx with ``torch_module=`` and
``example=``) gets ExecuTorch candidates; an .onnx alone is refused in one line (no converter turns
ONNX back into a PyTorch program faithfully: onnx2torch covers part of the opset and changes the
graph it rebuilds).  INT8 is PT2E post-training quantisation with XNNPACK's quantizer
(symmetric, per-channel weights), calibrated on the compile's calibration data, then lowered the
same way.  The program is portable: XNNPACK runs it on x86 here (so it is verified and timed with
the others) and on ARM boards; for aarch64 targets the candidate also ships ExecuTorch's runtime
built for the board as one runner library (``dlopt.targets.executorch_native``), which
``run_candidates.py`` loads through ctypes where no torch is installed, and ``dlopt verify`` runs
under qemu-aarch64 here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from dlopt.core.config import machine_cores
from dlopt.core.errors import CompileError, ConfigError, DloptError, first_line
from dlopt.core.optional import torch_threads
from dlopt.core.profiles import DeviceKind
from dlopt.targets import snippets
from dlopt.targets._native_output import native_output_logged
from dlopt.targets.base import Artifact, Backend
from dlopt.targets.executorch_plain import ExecutorchPlain

logger = logging.getLogger(__name__)

name = "executorch"
ENTRY = "model.pte"
SETTINGS_FILE = ExecutorchPlain.settings_file
VERSION_PIN = "1.5.1"  # the executorch release dlopt is tested with (its .pte format follows the release)
NOT_FROM_ONNX = ("built from a PyTorch module only (dlopt.compile(module, example=x), or torch_module= and example= "
                 "beside the .onnx it was exported from); no converter turns ONNX into a PyTorch program faithfully")


class ExecutorchSession:
    """A .pte on ExecuTorch's runtime here (its Python bindings), through the companion module's ``open``."""

    def __init__(self, folder: Path, settings: dict, threads: int | None = None) -> None:
        why = ExecutorchPlain.refusal(settings, repr)
        if why:
            raise ConfigError(f"{folder / SETTINGS_FILE} {why}; compile again")
        runtime = ExecutorchPlain.runtime()
        if runtime is None:
            raise ConfigError("the executorch package is not installed here: pip install 'dlopt[executorch]'")
        self.input_names = [s["name"] for s in settings["inputs"]]
        with native_output_logged("loading an ExecuTorch program"):  # its CPU probe's lines on fd 2
            self._run = ExecutorchPlain.open(runtime, folder, settings, threads, _clamp)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._run(feeds)
        except ValueError as exc:  # a feed at a shape the program was not exported for
            from dlopt.core.errors import DataError

            raise DataError(first_line(exc)) from exc


def _clamp(value, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return default
    return min(value, machine_cores())


def _example_args(example) -> tuple:
    """The example as a tuple of contiguous tensors: torch.export records each input's dim order, and a
    tensor from numpy with a size-1 axis (x[:, None]) can read as channels-last, which the program then
    demands of every input."""
    import torch

    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    return tuple(t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t for t in args)


class ExecutorchBackend(Backend):
    name, entry, settings_file = name, ENTRY, SETTINGS_FILE
    runtime_name, dlopt_extra = "ExecuTorch", "executorch"
    plain_runtime = "dlopt.targets.executorch_plain:ExecutorchPlain"
    own_precisions = ("int8",)  # PT2E on the module, not dlopt's ONNX passes
    own_quantiser = ("torchao", "pt2e xnnpack")
    options_section = "source"

    def available(self) -> bool | str:
        for module in ("torch", "executorch"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed; install dlopt[executorch]"
        return True

    def runtime_version(self) -> str:
        return f"executorch {metadata.version('executorch')}, torch {metadata.version('torch')}"

    def precisions(self, profile) -> tuple[str, ...]:
        return ("fp32", "int8") if profile.device is DeviceKind.CPU else ()

    def supports(self, model) -> list[str]:
        del model  # torch.export decides, at build time, from the module
        return []

    def refuses(self, options) -> str | None:
        return None if options is not None and options.torch_module is not None else NOT_FROM_ONNX

    def build_options(self, options, model, profile, shapes, *, threads: int, calibration=()) -> dict:
        """The module, its example and the calibration feeds; their digest enters the cache key."""
        del profile, shapes, threads
        digest = hashlib.sha256()
        state = options.torch_module.state_dict()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().numpy().tobytes())
        digest.update(type(options.torch_module).__qualname__.encode())
        for feed in calibration or ():
            for key in sorted(feed):
                digest.update(np.ascontiguousarray(feed[key]).tobytes())
        names = [v.name for v in model.graph.inputs]
        return {"source": options, "calibration": calibration, "input_names": names,
                "cache:source": digest.hexdigest()}

    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int, shapes=None,  # noqa: A001
                source=None, calibration=(), input_names=()) -> Artifact:
        if source is None or source.torch_module is None:
            raise CompileError(f"ExecuTorch is {NOT_FROM_ONNX}")
        if precision not in self.precisions(profile):
            raise CompileError(f"ExecuTorch builds {', '.join(self.precisions(profile)) or 'nothing'} for "
                               f"{profile.name}, not {precision}")
        import torch

        workdir.mkdir(parents=True, exist_ok=True)
        example = _example_args(source.example)
        names = list(input_names) or [f"input_{i}" for i in range(len(example))]
        if len(names) != len(example):
            raise CompileError(f"the module takes {len(example)} inputs but its ONNX export has {len(names)}")
        module, training = source.torch_module, source.torch_module.training
        module.eval()
        try:
            with torch.no_grad(), _quiet_imports(), torch_threads(threads):  # torch's default: every core
                quantizer = _quantize(module, example, names, calibration) if precision == "int8" else None
                program = _lower(quantizer[0] if quantizer else module, example)
        except DloptError:
            raise
        except Exception as exc:  # torch.export and the lowering raise their own errors
            raise CompileError(f"ExecuTorch could not build {precision}: {first_line(exc)}") from exc
        finally:
            module.train(training)
        (workdir / ENTRY).write_bytes(program)
        threads, threads_from = profile.threads_for(threads)
        settings = {
            "inputs": [{"name": n, "dtype": str(t.numpy().dtype), "shape": list(t.shape)}
                       for n, t in zip(names, example)],
            "outputs": [v.name for v in model.graph.outputs], "threads": threads, "threads_from": threads_from,
            "executorch_version": metadata.version("executorch"), "torch_version": torch.__version__,
            "partitioner": "XnnpackPartitioner", **({"quantizer": quantizer[1]} if quantizer else {}),
        }
        files = [ENTRY, SETTINGS_FILE]
        if profile.arch == "aarch64":
            settings, shipped = _ship_native(workdir, settings, profile)
            files += shipped
        (workdir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        return Artifact(backend=name, precision=precision, folder=workdir, files=files, entry=ENTRY,
                        settings=settings)

    def load(self, artifact: Artifact, *, threads: int | None = None) -> ExecutorchSession:
        return ExecutorchSession(artifact.folder, artifact.settings, threads)

    def with_threads(self, settings: dict, threads: int) -> dict:
        return {**settings, "threads": threads}

    def library_cpu(self, settings: dict) -> tuple[str, str] | None:
        native = settings.get("native")
        if isinstance(native, dict) and native.get("arch") == "aarch64":
            return "aarch64", str(native.get("mcpu") or "")
        return None

    def build_limits(self, profile) -> str | None:
        if profile.arch != "aarch64":
            return None
        missing = _native_missing("aarch64")
        return None if missing is None else (f"the .pte ships without the board's runner library (the board then "
                                             f"needs pip install executorch, which pulls torch): {missing}")

    def install_lines(self, shipped: list, text) -> list[str]:
        del text
        versions = sorted({str(s.settings.get("executorch_version", "")) for s in shipped})
        pins = " ".join(f"executorch=={snippets.version(v)}" if snippets.version(v) else "executorch" for v in versions)
        line = f"ExecuTorch ({', '.join(s.key for s in shipped)}): `pip install {pins} numpy` (it pulls torch)"
        if any(isinstance(s.settings.get("native"), dict) for s in shipped):
            line += (f"; or nothing but numpy on the board: run_candidates.py loads the shipped "
                     f"{ExecutorchPlain.NATIVE} (ExecuTorch's runtime with XNNPACK, built for it) where no torch is")
        return [line]

    def plain_code(self, s, feeds: str, arch: str) -> list[str]:
        del arch
        threads = s.settings.get("threads")
        threads = threads if isinstance(threads, int) and not isinstance(threads, bool) else 0
        names = [str(i.get("name")) for i in s.settings.get("inputs") or [] if isinstance(i, dict)]
        code = ["import numpy as np", "import torch",
                "from executorch.extension.pybindings import portable_lib as et"]
        if threads:
            code.append(f"et._unsafe_reset_threadpool({threads})  # executorch.json's threads")
        code += [f"program = et._load_for_executorch({s.path(ENTRY)!r})",
                 f"feeds = {feeds}",
                 f"outs = [o.numpy() for o in program.run_method('forward', tuple(torch.from_numpy(feeds[n]) "
                 f"for n in {names!r}))]"]
        return code

    def fill_triton(self, config, artifact: Artifact, plain_file) -> str:
        del config, plain_file
        raise ConfigError(f"{artifact.backend}/{artifact.precision}: Triton has no ExecuTorch backend (ExecuTorch "
                          f"is an on-device runtime); package an ort or openvino candidate "
                          f"(OUT/bundle/<backend>-<precision>) for Triton")


@contextlib.contextmanager
def _quiet_imports():
    """torchao logs a warning per CUDA kernel library it cannot load on a CPU machine, and torch one about an
    enum it registers: lines about their internals, not the user's model."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # and the deprecations torch.export warns of inside its own code
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize(module, example: tuple, names: list[str], calibration) -> tuple:
    """(the PT2E-quantised module, what quantised it): XNNPACK's quantizer, symmetric per-channel weights,
    observers fed the calibration feeds at the example's batch."""
    import torch

    with _quiet_imports():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
    batches = 0
    for args in _calibration_args(calibration, names, example):
        prepared(*args)
        batches += 1
    if not batches:
        raise CompileError("ExecuTorch INT8 needs calibration feeds at the example's shape (--calib, or the "
                           "evaluation data); none fit")
    label = (f"XNNPACKQuantizer (symmetric, per-channel weights), torchao {metadata.version('torchao')}, "
             f"{batches} calibration batches")
    return convert_pt2e(prepared), label


def _calibration_args(calibration, names: list[str], example: tuple):
    """Positional tensors at the example's shapes from feed dicts (larger batches cut into its batch)."""
    import torch

    for feed in calibration or ():
        if not feed or any(n not in feed for n in names):
            continue
        arrays = [np.asarray(feed[n]) for n in names]
        batch = [int(t.shape[0]) if t.dim() else 1 for t in example]
        if any(a.shape[1:] != tuple(t.shape[1:]) or a.shape[0] % b for a, t, b in zip(arrays, example, batch)):
            continue
        for i in range(arrays[0].shape[0] // batch[0]):
            yield tuple(torch.from_numpy(np.array(a[i * b:(i + 1) * b], order="C", copy=True)).to(t.dtype)
                        for a, t, b in zip(arrays, example, batch))


def _lower(module, example: tuple) -> bytes:
    """torch.export -> edge dialect -> XNNPACK delegate -> the .pte's bytes."""
    import torch

    with _quiet_imports():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(module, example)
    return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _aarch64_site() -> Path:
    """Where PyPI's aarch64 executorch wheel is unpacked: the emulated aarch64's site/ (``make arm64-env``;
    ``$DLOPT_ARM64_ENV`` names another, as for ``dlopt.device.emulation``)."""
    root = os.environ.get("DLOPT_ARM64_ENV")
    return (Path(root) if root else Path(sys.prefix) / "arm64") / "site"


def _native_missing(arch: str) -> str | None:
    """What building ExecuTorch's runner library for ``arch`` lacks here (compiler, the arch's wheel), else None."""
    from dlopt.targets import executorch_native

    compiler, package = executorch_native.COMPILERS[arch]
    if shutil.which(compiler) is None:
        return f"{compiler} is missing (apt-get install {package})"
    if not (_aarch64_site() / "executorch" / "lib" / "libexecutorch.so").is_file():
        return f"the aarch64 executorch wheel is not in {_aarch64_site()} (run `make arm64-env`)"
    return None


def _ship_native(workdir: Path, settings: dict, profile) -> tuple[dict, list[str]]:
    """For an aarch64 board: ExecuTorch's runtime built for it beside the .pte, when it can be built here."""
    from dlopt.targets import executorch_native

    if _native_missing("aarch64") is not None:
        return settings, []
    before = {p.name for p in workdir.iterdir()}
    try:
        library = executorch_native.build(_aarch64_site(), workdir, "aarch64")
    except (OSError, RuntimeError, DloptError) as exc:
        logger.warning("ExecuTorch's runner library for aarch64 was not built: %s", first_line(exc))
        return settings, []
    shipped = sorted(p.name for p in workdir.iterdir() if p.name not in before and p.is_file())
    return {**settings, "native": {"arch": "aarch64", "mcpu": profile.mcpu or "", "library": library.name}}, shipped


BACKEND = ExecutorchBackend()
