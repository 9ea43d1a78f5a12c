import sys
from pathlib import Path

# tests/ holds shared helpers (models.py, helpers.py) imported by test modules.
sys.path.insert(0, str(Path(__file__).parent))

import os
import tempfile

import pytest


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
