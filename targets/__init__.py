"""Backends, one module each, imported only when asked for.

Heavy runtimes (OpenVINO, TVM, TensorRT) are imported inside their module, and a
module is imported only when its backend is used, so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from dlopt.core.artifacts import check_plain_files, read_folder_json
from dlopt.core.errors import ConfigError, TargetUnavailable
from dlopt.targets.base import Artifact, Backend, Session

__all__ = ["Artifact", "Backend", "Session", "BACKEND_MODULES", "REFERENCE_BACKEND", "get_backend", "backend_status",
           "build_limits", "read_artifact", "read_manifest", "load_artifact", "check_runs_here", "tunable_backend",
           "runs_over_rpc", "plain_runtime"]

# name -> module whose ``BACKEND`` is a dlopt.targets.base.Backend.  Names a profile lists but that
# are absent here are reported as "not implemented in this version".
BACKEND_MODULES = {
    "ort": "dlopt.targets.ort",
    "openvino": "dlopt.targets.openvino",
    "tvm": "dlopt.targets.tvm.backend",
    "tensorrt": "dlopt.targets.tensorrt",
    "c": "dlopt.targets.c.backend",
    "executorch": "dlopt.targets.executorch",
}


# The backend dlopt builds the original model with, to time every candidate against and check the others'
# outputs by: ONNX Runtime, a core dependency.
REFERENCE_BACKEND = "ort"


def tunable_backend(profile) -> str | None:
    """The first of ``profile``'s backends that `dlopt tune` tunes (its Backend's ``tunable``), else None."""
    return next((n for n in profile.backends if (b := get_backend(n)) is not None and b.tunable), None)


def runs_over_rpc(name) -> bool:
    """True when ``--rpc-tracker`` runs ``name``'s artefacts on the device (its Backend's ``runs_over_rpc``)."""
    backend = get_backend(name) if isinstance(name, str) else None
    return backend is not None and backend.runs_over_rpc


def plain_runtime(name) -> type | str | None:
    """The class of ``name``'s companion module (how run_candidates.py opens its candidates with the runtime
    alone), or the reason the script does not run them; None for a name this version does not know."""
    backend = get_backend(name) if isinstance(name, str) else None
    if backend is None:
        return None
    if backend.plain_runtime is None:
        return backend.not_run_by_script
    module, _, cls = backend.plain_runtime.partition(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str) -> Backend | None:
    """The backend called ``name`` (its module's ``BACKEND``), or None when this version has none."""
    module = BACKEND_MODULES.get(name)
    if module is None or importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module).BACKEND


def backend_status(name: str, profile=None) -> bool | str:
    """True when ``name`` can build here, else the reason it cannot; with ``profile``, for that target:
    the tools a build for it needs (a cross compiler) are on PATH, else what is missing and its install line."""
    backend = get_backend(name)
    if backend is None:
        return "not implemented in this version of dlopt"
    status = backend.available()
    if status is not True or profile is None:
        return status
    return backend.build_needs(profile)


def build_limits(name: str, profile) -> str | None:
    """What a build of ``name`` for ``profile`` goes without here, and what to install for it; None when
    nothing.  Such a backend still builds (the C backend's host-verified sources without arm-none-eabi-gcc)."""
    return get_backend(name).build_limits(profile) if backend_status(name, profile) is True else None


def refuse_decoder_output(folder: Path, manifest: object) -> None:
    """ConfigError (one line) for a ``--task text-generation`` output: a decoder runs with ``dlopt generate``,
    not through the verbs that feed a model .npz arrays."""
    if isinstance(manifest, dict) and manifest.get("task") == "text-generation":
        raise ConfigError(f"{folder} holds a decoder compiled with --task text-generation: run it with "
                          f"`dlopt generate {folder} --prompt TEXT` or dlopt.load(); run, verify, bench, serve, gate "
                          f"and package take the outputs of other compiles")


def read_artifact(folder) -> tuple[Artifact, Path]:
    """The artefact in ``folder`` and the root of the output it belongs to.

    ``folder`` is a compile's output folder (its manifest.json names the chosen backend)
    or one of its bundle candidates (``OUT/bundle/<backend>-<precision>/``), which has
    no manifest of its own: the root's manifest names it under ``bundle`` and its
    report.json lists its files.  Anything else is a ConfigError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; give a dlopt output folder or one of its bundle/ candidates")
    root, manifest, key = _owning_manifest(folder)
    refuse_decoder_output(root, manifest)
    if key is None:
        backend_name, precision, files = manifest.get("backend"), manifest.get("precision"), manifest.get("files")
    else:
        backend_name, _, precision = key.partition("/")
        files = _bundle_files(root, key)
        if files is None:
            files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if not (isinstance(backend_name, str) and isinstance(precision, str) and isinstance(files, list)):
        raise ConfigError(f"{root / MANIFEST} lacks backend, precision or files; recompile with dlopt")
    backend = get_backend(backend_name)
    if backend is None:
        raise TargetUnavailable(f"{backend_name} artefacts are not loaded by this version of dlopt")
    settings = read_folder_json(folder, backend.settings_file, missing_ok=True)
    if not isinstance(settings, dict):
        raise ConfigError(f"{folder} lacks a readable {backend.settings_file}, which {backend_name} artefacts "
                          f"ship with; recompile with dlopt")
    check_plain_files(folder, [*files, backend.entry], named_in=f"{backend_name}/{precision}")
    return Artifact(backend_name, precision, folder, files, backend.entry, settings=settings), root


MANIFEST = "manifest.json"


def read_manifest(folder: Path) -> dict | None:
    """The manifest.json of ``folder`` as a dict, or None when it has none (or one that is not an object).

    Read through ``artifacts.read_folder_json``: a manifest.json that is a symlink, FIFO or device,
    too large, too deep or not JSON is a one-line ConfigError, never a hang or a MemoryError."""
    manifest = read_folder_json(folder, MANIFEST, missing_ok=True)
    return manifest if isinstance(manifest, dict) else None


def _owning_manifest(folder: Path) -> tuple[Path, dict, str | None]:
    """(root, manifest, bundle key): that of the output whose ``bundle`` lists ``folder`` and the key
    it is listed under, else ``folder``'s own manifest (key None).

    The outer output comes first: its manifest holds the sha256 of the bundle's native files, and a
    manifest.json inside a bundle folder (dlopt never writes one there) is refused, never obeyed."""
    resolved = folder.resolve()
    for root in list(resolved.parents)[:2]:  # bundle/<backend>-<precision>/ sits two levels down
        try:
            parent = read_manifest(root)
        except ConfigError:  # an unreadable manifest.json above is not an output that lists this folder
            parent = None
        bundle = parent.get("bundle") if parent and "dlopt_version" in parent else None
        where = resolved.relative_to(root).as_posix()
        if isinstance(bundle, dict):
            key = next((k for k, v in bundle.items() if v == where and isinstance(k, str)), None)
            if key is not None:
                if os.path.lexists(folder / MANIFEST):
                    raise ConfigError(f"{folder} is the bundle candidate {key} of {root} but holds a manifest.json, "
                                      f"which dlopt never writes there; dlopt checks a bundle against the output's "
                                      f"manifest only: remove it or recompile")
                return root, parent, key
    manifest = read_manifest(folder)
    if manifest is not None:
        return folder, manifest, None
    raise ConfigError(f"{folder} is not a dlopt output folder (no readable manifest.json) "
                      f"nor a bundle candidate listed in one")


def _bundle_files(root: Path, key: str) -> list[str] | None:
    """The files report.json lists for candidate ``key``, or None without a report listing them."""
    report = read_folder_json(root, "report.json", missing_ok=True)
    try:
        row = next(c for c in report["candidates"] if f"{c['backend']}/{c['precision']}" == key)
    except (KeyError, TypeError, StopIteration):
        return None
    files = row.get("artifact_files")
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def check_runs_here(artifact: Artifact) -> None:
    """Raise TargetUnavailable, saying what the device needs, for an artefact this machine cannot run."""
    backend = get_backend(artifact.backend)
    if backend is None:
        raise TargetUnavailable(f"{artifact.backend}/{artifact.precision} in {artifact.folder} cannot run here: "
                                f"not implemented in this version of dlopt")
    backend.check_runs_here(artifact)


def load_artifact(folder, *, threads: int | None = None):
    """Load the artefact a compile published in ``folder`` (or one of its bundle candidates).

    Returns the backend's session (``run(feeds) -> list of arrays``) built with the shipped
    settings (``threads`` replaces their thread count) for artefacts that run on this
    machine; raises TargetUnavailable for ones built for a device.
    """
    artifact, _ = read_artifact(folder)
    return load(artifact, threads=threads)


def load(artifact: Artifact, *, threads: int | None = None):
    """The session of ``artifact`` (see ``load_artifact``)."""
    from dataclasses import replace

    check_runs_here(artifact)
    backend = get_backend(artifact.backend)
    if threads is not None:
        artifact = replace(artifact, settings=backend.with_threads(artifact.settings, threads))
    return backend.load(artifact)
