"""dlopt.core.optional.require: every optional-dependency guard names the extra to install, in one line.

A missing package is made real for the test by ``sys.modules[name] = None``, which Python's import
system (and ``importlib.util.find_spec``) treats as not installed."""

from __future__ import annotations

import json
import sys

import pytest

from dlopt.compression import distillation, pruning
from dlopt.deploy import metrics_export, tracking, triton
from dlopt.workflows import sweep
from dlopt.core.errors import TargetUnavailable
from dlopt.core.optional import require
from dlopt.deploy.options import PublishOptions


def test_an_installed_module_is_returned_or_found():
    assert require("json", "x", "this needs json") is json
    assert require("json", "x", "this needs json", load=False) is None


@pytest.mark.parametrize("load", [True, False])
@pytest.mark.parametrize("module", ["dlopt_no_such_package", "dlopt_no_such_package.sub"])
def test_a_missing_module_names_the_extra(module, load):
    with pytest.raises(TargetUnavailable) as err:
        require(module, "demo", "the demo needs it", load=load)
    assert str(err.value) == "the demo needs it: pip install 'dlopt[demo]'"


@pytest.mark.parametrize("blocked, call, message", [
    ("torch", distillation._torch, "distillation needs torch: pip install 'dlopt[torch]'"),
    ("torch_pruning", pruning._tp, "structured pruning needs torch-pruning: pip install 'dlopt[prune]'"),
    ("prometheus_client", metrics_export._client,
     "--metrics-file and --pushgateway need prometheus-client: pip install 'dlopt[prometheus]'"),
    ("mlflow.tracking", lambda: tracking.resolve_uri(None), "--mlflow needs MLflow: pip install 'dlopt[mlflow]'"),
    ("mlflow.tracking", lambda: tracking._client("file:///x"), "--mlflow needs MLflow: pip install 'dlopt[mlflow]'"),
    ("ray", lambda: next(sweep._run_ray([], None, 1, 1)), "--ray needs Ray: pip install 'dlopt[ray]'"),
    ("prometheus_client", lambda: PublishOptions(metrics_file="m.prom").check(),
     "this needs prometheus_client: pip install 'dlopt[prometheus]'"),
    ("tritonclient", triton.model_config_pb2.__wrapped__,
     "Triton packaging needs tritonclient's ModelConfig protobuf: pip install 'dlopt[triton]'"),
])
def test_each_guard_says_what_needed_it_and_which_extra(monkeypatch, tmp_path, blocked, call, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, blocked, None)
    with pytest.raises(TargetUnavailable) as err:
        call()
    assert str(err.value) == message
