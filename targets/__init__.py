"""Backends, one module each, imported only when asked for.

Heavy runtimes (OpenVINO, TVM, TensorRT) are imported inside their module, and a
module is imported only when its backend is used, so ``dlopt --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util

from dlopt.targets.base import Artifact, Backend, Session

__all__ = ["Artifact", "Backend", "Session", "BACKEND_MODULES", "get_backend", "backend_status"]

# name -> module whose ``BACKEND`` is a dlopt.targets.base.Backend.  Names a profile lists but that
# are absent here are reported as "not implemented in this version".
BACKEND_MODULES = {
    "ort": "dlopt.targets.ort",
    "openvino": "dlopt.targets.openvino",
    "tvm": "dlopt.targets.tvm",
    "tensorrt": "dlopt.targets.tensorrt",
}


def get_backend(name: str) -> Backend | None:
    """The backend called ``name`` (its module's ``BACKEND``), or None when this version has none."""
    module = BACKEND_MODULES.get(name)
    if module is None or importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module).BACKEND


def backend_status(name: str) -> bool | str:
    """True when ``name`` can build here, else the reason it cannot."""
    backend = get_backend(name)
    if backend is None:
        return "not implemented in this version of dlopt"
    return backend.available()


def load_artifact(folder):
    """Load the artefact a compile published in ``folder`` (its manifest says which backend).

    Returns the backend's session (``run(feeds) -> list of arrays``) for artefacts that run
    on this machine; raises TargetUnavailable for ones built for a device.
    """
    import json
    from pathlib import Path

    from dlopt.errors import ConfigError, TargetUnavailable

    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} is not a dlopt output folder (no readable manifest.json)") from exc
    backend = get_backend(manifest["backend"])
    if backend is None:
        raise TargetUnavailable(f"{manifest['backend']} artefacts are not loaded by this version of dlopt")
    settings = json.loads((folder / backend.settings_file).read_text())
    artifact = Artifact(manifest["backend"], manifest["precision"], folder, manifest["files"], backend.entry,
                        settings=settings)
    return backend.load(artifact)
