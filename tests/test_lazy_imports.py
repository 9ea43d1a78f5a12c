"""`dlopt --help` must not pay for torch, TVM, OpenVINO or even ONNX at start-up."""

import subprocess
import sys

HEAVY = ["torch", "tvm", "openvino", "tensorrt", "onnxruntime", "onnx", "onnxscript", "onnxsim", "mlflow", "ray",
         "tritonclient", "prometheus_client", "torch_pruning"]


def test_cli_import_loads_no_heavy_module():
    probe = "import sys, dlopt, dlopt.cli.app; print(','.join(m for m in %r if m in sys.modules))" % HEAVY
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_help_of_every_verb_has_an_example():
    from click.testing import CliRunner

    from dlopt.cli.app import main

    runner = CliRunner()
    verbs = sorted(main.commands)
    assert {"compile", "inspect", "targets", "demo", "gate", "run"} <= set(verbs)
    for verb in verbs:
        result = runner.invoke(main, [verb, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output and f"dlopt {verb}" in result.output


def test_onnxsim_child_does_not_import_torch(tmp_path):
    # onnxsim's __init__ imports torch for an optional bridge simplify() never uses: 4-7 s of every
    # SimplifyPass on a loaded 2-core machine, for 0.2 s of simplifying (dlopt.passes.simplify.main)
    import models

    source = models.save(models.foldable_constants(), tmp_path / "in.onnx")
    probe = ("import atexit, sys; atexit.register(lambda: print(sys.modules.get('torch') is not None)); "
             "from dlopt.passes.simplify import main; main()")
    done = subprocess.run([sys.executable, "-c", probe, source, str(tmp_path / "out.onnx"), "--fold-limit", "1000"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False" and (tmp_path / "out.onnx").is_file()


def test_the_verbs_that_read_an_output_folder_load_no_onnx_before_their_checks():
    """`dlopt run/verify/bench/serve` refuse a bad folder or option after importing their modules: onnx (with
    ml_dtypes) and onnx_ir (with sympy) were 1.1 of their 1.2 CPU-s, paid before saying the folder is missing."""
    modules = ["dlopt.measure.runner", "dlopt.workflows.verify", "dlopt.deploy.serve", "dlopt.core.artifacts",
               "dlopt.core.specs"]
    probe = ("import sys; " + "; ".join(f"import {m}" for m in modules)
             + "; print(','.join(m for m in ('onnx', 'onnx_ir', 'sympy', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
