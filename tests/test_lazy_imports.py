"""`dlopt --help` must not pay for torch, TVM, OpenVINO or even ONNX at start-up."""

import subprocess
import sys

HEAVY = ["torch", "tvm", "openvino", "tensorrt", "onnxruntime", "onnx", "onnxscript", "onnxsim", "mlflow", "ray",
         "tritonclient", "prometheus_client", "torch_pruning"]


def test_cli_import_loads_no_heavy_module():
    probe = "import sys, dlopt, dlopt.cli; print(','.join(m for m in %r if m in sys.modules))" % HEAVY
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_help_of_every_verb_has_an_example():
    from click.testing import CliRunner

    from dlopt.cli import main

    runner = CliRunner()
    verbs = sorted(main.commands)
    assert {"compile", "inspect", "targets", "demo", "gate", "run"} <= set(verbs)
    for verb in verbs:
        result = runner.invoke(main, [verb, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output and f"dlopt {verb}" in result.output
