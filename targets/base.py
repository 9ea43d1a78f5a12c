"""What every backend module provides, and the artefact it hands back."""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np
from dlopt.core.errors import ConfigError, TargetUnavailable


@dataclass
class Artifact:
    """A compiled candidate on disk: ``folder`` holds ``files`` (names relative to it)."""

    backend: str
    precision: str
    folder: Path
    files: list[str]
    entry: str  # the file a runtime loads (model.onnx, model.xml, lib.so, ...)
    loadable_here: bool = True  # this host can load and run it (timing needs the target itself)
    settings: dict[str, Any] = field(default_factory=dict)  # runtime settings to reproduce it
    # An ONNX file in ``files`` that ONNX Runtime here can run to check the outputs of an
    # artefact that itself only runs on the device (a TensorRT bundle's model.onnx).
    check_onnx: str | None = None

    @property
    def entry_path(self) -> Path:
        return self.folder / self.entry

    def size_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


class Session(Protocol):
    """A loaded artefact that runs feeds of numpy arrays.

    ``ran_as`` (optional attribute) is the precision the runtime actually executes
    in, when it can differ from the artefact's (OpenVINO runs f32 IR in bf16 on
    AMX CPUs unless told otherwise).
    """

    input_names: Sequence[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(abc.ABC):
    """A backend: one subclass per module in ``dlopt.targets``, one instance (``BACKEND``) each.

    A new backend fills in this form; a subclass missing a class attribute fails at import,
    and one missing a method cannot be instantiated.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = ("name", "entry", "settings_file")
    name: ClassVar[str]
    entry: ClassVar[str]  # the file a runtime loads (model.onnx, model.xml, model.so)
    settings_file: ClassVar[str]  # JSON beside it with the runtime settings it ships with
    # precisions the backend converts itself from the float model (OpenVINO compresses fp16)
    own_precisions: ClassVar[tuple[str, ...]] = ()
    # False: static (QDQ) INT8 of a transformer runs no faster than its float model here, so
    # --precision auto builds int8-dynamic instead (dlopt.flow.recipe decides what a transformer is)
    static_int8_for_transformers: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        missing = [attr for attr in Backend.REQUIRED if not hasattr(cls, attr)]
        if missing and not getattr(cls, "__abstractmethods__", None):
            raise TypeError(f"backend {cls.__name__} lacks {', '.join(missing)}")

    @abc.abstractmethod
    def available(self) -> bool | str:
        """True, or the reason this backend cannot be used on this machine."""

    @abc.abstractmethod
    def runtime_version(self) -> str:
        """The runtime's version: part of the artefact cache key, so an upgrade rebuilds."""

    @abc.abstractmethod
    def precisions(self, profile) -> tuple[str, ...]:
        """Precisions this backend can build for ``profile`` (e.g. fp32, fp16, int8, mixed, bf16)."""

    @abc.abstractmethod
    def supports(self, model) -> list[str]:
        """Ops of ``model`` (an onnx_ir Model) this backend cannot run; empty when all are fine."""

    def lowering_passes(self, precision: str) -> list:
        """Passes this backend owns, run after the precision passes (the pipeline instruments them)."""
        del precision
        return []

    @abc.abstractmethod
    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int,
                shapes: dict[str, tuple[int, ...]] | None = None) -> Artifact:
        """Write the artefact for ``model`` into ``workdir`` and describe it.

        ``shapes``: the declared timing shape of each input, for runtimes that need static
        shapes (symbolic dimensions other than the batch take their size from it)."""

    @abc.abstractmethod
    def load(self, artifact: Artifact) -> Session:
        """Load an artefact built by ``compile`` for running on this machine."""

    # the CompileConfig section this backend reads ("tvm", "mcu"); it receives that section only
    options_section: ClassVar[str | None] = None

    def build_options(self, options, model, profile, shapes, *, threads: int, calibration=()) -> dict:
        """Extra keyword arguments for ``compile`` from the backend's own config section ``options``
        (None when it has none; TVM: its tuning database); keys starting ``cache:`` only enter the
        artefact cache key.  ``calibration``: the calibration feeds, for a backend that quantises itself."""
        del options, model, profile, shapes, threads, calibration
        return {}

    def refuses(self, options) -> str | None:
        """Why this backend builds nothing from this compile's input (given its config section ``options``),
        in one line; None when it can build.  ExecuTorch builds from a PyTorch module, never from ONNX."""
        del options
        return None

    # -- what the rest of dlopt asks a backend, so that no code outside targets/ names one ---------------

    runtime_name: ClassVar[str] = ""  # its runtime in the output README ("ONNX Runtime"); "" for none
    dlopt_extra: ClassVar[str | None] = None  # dlopt's pip extra that installs the runtime, if one does
    checked_elsewhere: ClassVar[str] = ""  # where its outputs are verified when not on itself (" on ONNX Runtime")
    unbuilt_note: ClassVar[str] = ""  # what a device still does before timing it ("engine not built yet; ")
    # (package, mode) of the quantiser a backend runs itself for its own_precisions (ExecuTorch: torchao's PT2E)
    own_quantiser: ClassVar[tuple[str, str] | None] = None
    prefers_nncf: ClassVar[bool] = False  # INT8 through NNCF (its own quantiser) when NNCF is installed
    # INT8 weights in 7 bits where the target's int8 kernels may saturate (OpenVINO's x86 kernels without VNNI)
    reduce_range_where_saturating: ClassVar[bool] = False
    tunable: ClassVar[bool] = False  # `dlopt tune` writes tuning records that its compile reads
    runs_over_rpc: ClassVar[bool] = False  # `--rpc-tracker` runs its artefacts on the device (load_remote)

    # Its compile needs the inputs themselves (static shapes, constant shape operands): the ONNX backend
    # adapter (dlopt.onnx_backend) builds it at the first run, per input shapes.
    compiles_per_input_shapes: ClassVar[bool] = False
    # Ops it converts wrongly although ONNX defines them by a function body, which it runs right: the ONNX
    # backend adapter expands them first.
    expand_function_ops: ClassVar[frozenset[str]] = frozenset()
    # Its companion module for run_candidates.py and `dlopt verify` ("module:Class", numpy and the runtime
    # only: see dlopt.targets.ort_plain), or why the script does not run its candidates.
    plain_runtime: ClassVar[str | None] = None
    not_run_by_script: ClassVar[str] = "unknown backend"

    def build_needs(self, profile) -> bool | str:
        """True when a build for ``profile`` finds what it needs beyond the runtime (a cross compiler), else
        what is missing and its install line: the backend cannot build for it."""
        del profile
        return True

    def build_limits(self, profile) -> str | None:
        """What a build for ``profile`` goes without when a tool is missing (it still builds), and what to
        install for it; None when nothing."""
        del profile
        return None

    def with_threads(self, settings: dict, threads: int) -> dict:
        """``settings`` (its settings file) running on ``threads`` threads; unchanged where it has no count."""
        del threads
        return settings

    def check_runs_here(self, artifact: Artifact) -> None:
        """Raise TargetUnavailable, saying what the device needs, when this machine cannot run ``artifact``."""
        status = self.available()
        if status is not True:
            raise TargetUnavailable(f"{artifact.backend}/{artifact.precision} in {artifact.folder} cannot run "
                                    f"here: {status}")

    def built_inputs(self, settings: dict) -> list[dict] | None:
        """The inputs (name, dtype, shape, dynamic_batch) an artefact shipped with ``settings`` was built for, where
        its shapes are fixed at build time (a TVM library); None where the model's own inputs hold."""
        del settings
        return None

    def library_cpu(self, settings: dict) -> tuple[str, str] | None:
        """(arch, mcpu) of a native CPU library shipped with ``settings``, which `dlopt verify` can run under
        an emulated CPU of that arch; None where the artefact is no such library."""
        del settings
        return None

    def runs_with_dlopt(self, settings: dict) -> bool:
        """True when ``dlopt.load`` on the device runs a candidate shipped with ``settings``."""
        del settings
        return True

    def install_lines(self, shipped: list, text) -> list[str]:
        """The output README's lines installing the runtime of ``shipped`` (its candidates of this backend:
        ``key``, ``settings``, ``path(name)``); ``text`` escapes prose from the folder."""
        del text
        return [f"{self.runtime_name or self.name} ({', '.join(s.key for s in shipped)}): `pip install numpy` "
                f"and the runtime this backend loads"]

    def plain_code(self, shipped, feeds: str, arch: str) -> list[str] | None:
        """Python running the candidate ``shipped`` with its runtime alone (``feeds``: a Python literal of the
        inputs; ``arch``: the target's), or None where there is none."""
        del shipped, feeds, arch
        return None

    def readme_verify(self, shipped: list, verify_file: str, script: str) -> list[str]:
        """The output README's paragraph on verifying ``shipped`` (its candidates of this backend) beyond
        ``dlopt verify`` and ``script``; none by default."""
        del shipped, verify_file, script
        return []

    def fill_triton(self, config, artifact: Artifact, plain_file) -> str:
        """Fill Triton's ``config`` (an inference.ModelConfig) for ``artifact``: platform/backend, default
        model file, parameters, accelerators; returns the instance kind (KIND_CPU, KIND_GPU).
        ``plain_file(name)`` is the artefact's file as a checked Path, or None when absent."""
        del config, plain_file
        raise ConfigError(f"{artifact.backend}/{artifact.precision} artefacts have no Triton backend; package an "
                          f"ort, openvino or tensorrt candidate (OUT/bundle/<backend>-<precision>), or compile for "
                          f"a target whose backends are those")

    def load_remote(self, artifact: Artifact, device, *, threads: int | None = None) -> Session:
        """A session running ``artifact`` on ``device`` (a dlopt.targets.tvm.rpc.RemoteDevice) through
        TVM's RPC tracker, with ``time(feed, runs, warmup)`` measured on the device; TVM only."""
        del artifact, device, threads
        raise TargetUnavailable(f"{self.name} artefacts do not run through TVM's RPC; only TVM libraries do")
