import sys
from pathlib import Path

# tests/ holds shared helpers (models.py, helpers.py) imported by test modules.
sys.path.insert(0, str(Path(__file__).parent))

import os
import tempfile

import pytest

import heavy_first


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` hands out the heaviest test file left first (tests/heavy_first.py, its table in
    tests/file_seconds.json), so that the long files start at once rather than last."""
    return heavy_first.make_scheduler(config, log)


@pytest.fixture(autouse=True, scope="session")
def _private_artifact_cache():
    """Keep the tests' artefact cache out of the user's ~/.cache (subprocesses inherit it)."""
    with tempfile.TemporaryDirectory(prefix="dlopt-test-cache-") as root:
        old = os.environ.get("DLOPT_CACHE")
        os.environ["DLOPT_CACHE"] = root
        yield
        if old is None:
            os.environ.pop("DLOPT_CACHE", None)
        else:
            os.environ["DLOPT_CACHE"] = old


@pytest.fixture(scope="session")
def ort_output(tmp_path_factory):
    """(output folder, report dict) of a compile of a small CNN with a symbolic batch for an ORT-only
    target (fp32 and int8 built), shared by the tests that publish a compile elsewhere (MLflow,
    Prometheus): they read it and never write into it."""
    import models

    import dlopt

    root = tmp_path_factory.mktemp("ort-output")
    model = models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx")
    (root / "targets.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n'
                                       'precisions = ["fp32", "int8"]\n')
    out = root / "out"
    report = dlopt.compile(model, target="here", targets_file=root / "targets.toml", out=out, precision="auto",
                           samples=4, runs=5, warmup=1, max_accuracy_drop=100.0)
    return out, report.to_dict()
