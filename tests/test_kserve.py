"""KServe InferenceService manifests for a Triton repository, checked against the fields of KServe's
v1beta1 CRD schema they use (types, required keys, Kubernetes name and quantity formats)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from click.testing import CliRunner

import models

pytest.importorskip("tritonclient", reason="Triton packaging needs tritonclient (pip install 'dlopt[triton]')")
yaml = pytest.importorskip("yaml", reason="reading the manifest back needs PyYAML")
jsonschema = pytest.importorskip("jsonschema", reason="checking the manifest needs jsonschema")

import dlopt  # noqa: E402
from dlopt.core.errors import ConfigError  # noqa: E402
from dlopt.cli.package import package  # noqa: E402
from dlopt.deploy.triton import read_config  # noqa: E402

TARGETS = """
[targets.ship]
base = "x86-avx2"
cpu_flags = ["dlopt-not-this-host"]
backends = ["ort"]
precisions = ["fp32"]
cores = 4

[targets.gpu]
base = "nvidia-gpu"
backends = ["tensorrt"]
precisions = ["fp16"]
"""

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Mi|Gi|Ki)?$"
# The part of KServe's serving.kserve.io/v1beta1 InferenceService CRD (config/crd/full/
# serving.kserve.io_inferenceservices.yaml) that the manifest uses, closed to other keys.
SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object", "required": ["predictor"], "additionalProperties": False,
            "properties": {"predictor": {
                "type": "object", "required": ["model"], "additionalProperties": False,
                "properties": {"model": {
                    "type": "object", "required": ["modelFormat", "storageUri"], "additionalProperties": False,
                    "properties": {
                        "modelFormat": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
                        "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                        "runtime": {"type": "string"},
                        "storageUri": {"type": "string", "pattern": r"^[a-z0-9]+://"},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "resources": {
                            "type": "object", "additionalProperties": False,
                            "properties": {k: {"type": "object", "additionalProperties":
                                               {"type": "string", "pattern": QUANTITY}}
                                           for k in ("requests", "limits")},
                        },
                    },
                }},
            }},
        },
    },
}


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve")
    model = models.save(models.conv_bn_relu(batch="N"), root / "Demo CNN.onnx")
    (root / "targets.toml").write_text(TARGETS)
    result = {}
    for target in ("ship", "gpu"):
        result[target] = root / f"out-{target}"
        dlopt.compile(model, target=target, targets_file=root / "targets.toml", out=result[target], samples=2)
    return result


def _package(args) -> None:
    result = CliRunner().invoke(package, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)


def test_cpu_manifest(outs, tmp_path):
    repo = tmp_path / "repo"
    _package([outs["ship"], "--triton", repo, "--kserve"])
    path = repo / "Demo_CNN-inferenceservice.yaml"
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    model = doc["spec"]["predictor"]["model"]
    assert doc["metadata"]["name"] == "demo-cnn"
    assert doc["metadata"]["annotations"]["dlopt.io/triton-model"] == "Demo_CNN"
    assert read_config(repo / "Demo_CNN" / "config.pbtxt").name == "Demo_CNN"  # the model it serves exists
    assert (model["modelFormat"]["name"], model["runtime"], model["protocolVersion"]) == \
        ("triton", "kserve-tritonserver", "v2")
    assert model["storageUri"] == "s3://CHANGE-ME/models/repo"
    # the 4 cores of the target (the ORT threads dlopt chose), 512 Mi floor, no GPU
    assert model["resources"] == {"requests": {"cpu": "4", "memory": "512Mi"},
                                  "limits": {"cpu": "4", "memory": "512Mi"}}
    assert "--load-model=Demo_CNN" in model["args"]
    # written again over its own file; never over someone else's
    _package([outs["ship"], "--triton", repo, "--kserve", "--version", "2"])
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text("apiVersion: v1\nkind: ConfigMap\n")
    result = CliRunner().invoke(package, [str(outs["ship"]), "--triton", str(repo), "--kserve", str(theirs)])
    assert isinstance(result.exception, ConfigError) and "not a manifest dlopt wrote" in str(result.exception)
    assert theirs.read_text() == "apiVersion: v1\nkind: ConfigMap\n"


def test_gpu_manifest(outs, tmp_path):
    repo, manifest = tmp_path / "repo", tmp_path / "k8s" / "isvc.yaml"
    _package([outs["gpu"], "--triton", repo, "--name", "cnn", "--kserve", manifest])
    doc = yaml.safe_load(manifest.read_text())
    jsonschema.validate(doc, SCHEMA)
    resources = doc["spec"]["predictor"]["model"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("given, message", [
    (["--kserve"], "--kserve needs --triton REPO (it describes the Triton model)"),
    (["--name", "cnn", "--kserve"], "--name and --kserve need --triton REPO (they describe the Triton model)"),
    (["--name", "cnn", "--max-batch-size", "4", "--kserve"],
     "--name, --max-batch-size and --kserve need --triton REPO (they describe the Triton model)"),
])
def test_triton_options_need_triton(tmp_path, given, message):
    """Refused before the output folder is read (it need not exist): one line, exit 2, in English."""
    result = CliRunner().invoke(package, [str(tmp_path / "out"), *given, "--mlflow"])
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    assert str(result.exception) == message


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")
def test_kubectl_reads_it(outs, tmp_path):
    """kubectl parses the manifest as a Kubernetes object offline (--local: `apply --dry-run=client`
    also asks a cluster's API discovery for the InferenceService kind, which needs KServe installed)."""
    import json

    repo = tmp_path / "repo"
    _package([outs["ship"], "--triton", repo, "--kserve"])
    path = repo / "Demo_CNN-inferenceservice.yaml"
    done = subprocess.run(["kubectl", "label", "--local", "-f", str(path), "dlopt-check=ok", "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen, ours = json.loads(done.stdout), yaml.safe_load(path.read_text())
    assert seen["metadata"].pop("labels") == {"dlopt-check": "ok"}
    assert seen == ours
