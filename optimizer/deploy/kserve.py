"""A KServe ``InferenceService`` that serves a Triton model repository dlopt wrote.

The manifest uses KServe's v1beta1 predictor ``model`` form with the Triton serving runtime
(``kserve-tritonserver``, open inference protocol v2).  ``storageUri`` is a placeholder: upload
the repository folder there and replace it.  Resources follow the artefact: the CPU threads the
compile chose, memory from the artefact's size, one GPU when Triton runs it on a GPU.

Guarantees: the manifest is written whole (temp file, rename) and only over a file dlopt wrote; the
memory estimate counts the version folder's plain files only, following no link.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path

from dlopt.core.artifacts import write_file
from dlopt.core.errors import ConfigError

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
RUNTIME = "kserve-tritonserver"
STORAGE_PLACEHOLDER = "s3://CHANGE-ME/models/{repository}"
HEADER = "# InferenceService written by dlopt"
MIN_MEMORY_MI = 512
MAX_NAME = 45  # KServe appends "-predictor-..." to the name; Kubernetes labels stop at 63


def service_name(model_name: str) -> str:
    """``model_name`` as a DNS-1123 label KServe accepts."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    name = name if name and name[0].isalpha() else f"m-{name}".rstrip("-")
    return name[:MAX_NAME].rstrip("-")


def manifest(triton_model, *, storage_uri: str | None = None) -> dict:
    """The InferenceService for a ``dlopt.deploy.triton.TritonModel``."""
    config = triton_model.config
    threads = _threads(config)
    size = _plain_bytes(triton_model.folder / str(triton_model.version))
    # the runtime holds the weights, its own buffers and Triton: 4x the artefact, at least 512 Mi
    memory_mi = max(MIN_MEMORY_MI, int(math.ceil(4 * size / 2**20 / 256)) * 256)
    requests = {"cpu": str(threads), "memory": f"{memory_mi}Mi"}
    limits = dict(requests)
    if triton_model.device_kind == "gpu":
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = "1"
    uri = storage_uri or STORAGE_PLACEHOLDER.format(repository=triton_model.repository.name)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": service_name(triton_model.name),
            "annotations": {"dlopt.io/triton-model": triton_model.name,
                            "dlopt.io/triton-version": str(triton_model.version)},
        },
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "triton"},
            "protocolVersion": "v2",
            "runtime": RUNTIME,
            "storageUri": uri,
            "args": ["--model-control-mode=explicit", f"--load-model={triton_model.name}"],
            "resources": {"requests": requests, "limits": limits},
        }}},
    }


def _plain_bytes(folder: Path) -> int:
    """Bytes of the regular files in ``folder``, never following a link (dlopt wrote plain files there)."""
    sizes = (os.lstat(p) for p in Path(folder).iterdir())
    return sum(info.st_size for info in sizes if stat.S_ISREG(info.st_mode))


def _threads(config) -> int:
    """CPU threads the artefact was built to use (1 when it does not say)."""
    for key in ("intra_op_thread_count", "INFERENCE_NUM_THREADS"):
        if key in config.parameters:
            try:
                return max(1, int(config.parameters[key].string_value))
            except ValueError:
                pass
    return 1


def to_text(document: dict) -> str:
    """YAML when PyYAML is there, else JSON (which is YAML too): kubectl reads either."""
    try:
        import yaml
    except ImportError:
        import json

        return json.dumps(document, indent=2) + "\n"
    return f"{HEADER}; replace storageUri with where you uploaded the repository\n" + \
        yaml.safe_dump(document, sort_keys=False)


def check_manifest_path(path: Path) -> None:
    """ConfigError for a --kserve path that is a folder or a file dlopt did not write."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--kserve {path} is a folder; give a file such as {path / 'inferenceservice.yaml'}")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file() or not _ours(path):
            raise ConfigError(f"--kserve {path} exists and is not a manifest dlopt wrote; give another path")


def write_manifest(path: Path, document: dict) -> Path:
    """Write ``document`` to ``path`` atomically; refuse a file dlopt did not write."""
    path = Path(path)
    check_manifest_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    return write_file(path, to_text(document))


def _ours(path: Path) -> bool:
    try:
        text = path.read_text()[:4096]
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith(HEADER) or ('"dlopt.io/triton-model"' in text and f'"{KIND}"' in text)
