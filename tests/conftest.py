import sys
from pathlib import Path

# tests/ holds shared helpers (models.py, helpers.py) imported by test modules.
sys.path.insert(0, str(Path(__file__).parent))

import os
import tempfile

import pytest

import heavy_first

# One thread per build and timing (dlopt.core.config.default_threads), in this process and every dlopt it
# starts: the suite runs 3 workers on 2 cores, where each runtime's extra threads only spin while they wait
# (a default CPU compile of a small CNN: 12.8 -> 9.6 CPU-s).  Tests about thread counts pass --threads, or
# set or remove DLOPT_THREADS themselves (monkeypatch).
os.environ.setdefault("DLOPT_THREADS", "1")
# and one OpenMP thread for what dlopt does not size itself: torch (the fixtures' training and exports; a
# ResNet fixture's training cost 8 CPU-s quiet and 45 beside the other workers), OpenBLAS under numpy
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With $DLOPT_TEST_CPU_LOG set, appends "cpu-seconds<TAB>wall-seconds<TAB>test" per test to that file:
    this process's CPU plus that of the subprocesses it waited for (setup and teardown included), which is
    what a 2-core machine pays for the test, whatever else runs beside it."""
    log = os.environ.get("DLOPT_TEST_CPU_LOG")
    if not log:
        yield
        return
    import resource
    import time

    def cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    start, wall = cpu(), time.monotonic()
    yield
    line = f"{cpu() - start:.2f}\t{time.monotonic() - wall:.2f}\t{item.nodeid}\n"
    with open(log, "a") as f:
        f.write(line)


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
