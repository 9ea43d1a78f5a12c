"""TVM's import leaves torch alone: tvm_ffi imports torch whenever it is installed (to convert torch tensors,
which dlopt never passes), 1.8 of 3.2 CPU-s of TVM's import in a fresh process here. A compile that builds,
verifies and times a TVM library, and ``dlopt.load`` of it, run without torch in sys.modules; torch imports
as usual afterwards and the library still runs.  MetaSchedule's worker processes import TVM without torch
too (``workers_without_torch`` here; a real tune's workers in tests/targets/test_tvm_tuning.py, which has
one to look at)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models

pytest.importorskip("tvm", reason="apache-tvm is not installed (dlopt[tvm])")

TARGETS = '[targets.tvm-here]\nbase = "cpu"\nbackends = ["tvm"]\nprecisions = ["fp32"]\n'
PROBE = """
import json, sys
import numpy as np
import dlopt
model, targets, out = sys.argv[1:4]
report = dlopt.compile(model, target="tvm-here", targets_file=targets, out=out, precision="fp32", runs=5, warmup=1)
built = [c for c in report.candidates if c.backend == "tvm" and c.status == "ok"]
torch_after_compile = "torch" in sys.modules
x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
session = dlopt.load(out)
before = session.run({"x": x})[0]
torch_after_load = "torch" in sys.modules
import torch
after = session.run({"x": x})[0]
print(json.dumps({"built": len(built), "chosen": str(report.chosen),
                  "torch_after_compile": torch_after_compile, "torch_after_load": torch_after_load,
                  "torch_works": float(torch.ones(3).sum()), "same": bool(np.array_equal(before, after))}))
"""


def test_a_tvm_compile_and_load_leave_torch_unimported_and_torch_works_after(tmp_path):
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    (tmp_path / "targets.toml").write_text(TARGETS)
    tests = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", PROBE, str(model), str(tmp_path / "targets.toml"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": tests})
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts == {"built": 1, "chosen": "tvm/fp32", "torch_after_compile": False, "torch_after_load": False,
                     "torch_works": 3.0, "same": True}, facts


def test_the_rpc_relay_child_imports_the_standard_library_only():
    """The relay's handshake deadline counts from when dlopt asked: its start must be short. Run through rpc.py
    it imported numpy, onnx and dlopt (1.3 CPU-s, ten seconds of wall at load 17) and missed the deadline."""
    import ast

    from dlopt.targets.tvm import rpc, rpc_relay

    tree = ast.parse(Path(rpc_relay.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported and imported - {"__future__"} <= set(sys.stdlib_module_names), imported
    # the child rpc.py starts is this file, run without the script's folder on sys.path (-P)
    assert rpc.rpc_relay.__file__ == rpc_relay.__file__ and rpc.TALK_TIMEOUT_S == rpc_relay.TALK_TIMEOUT_S


@pytest.mark.parametrize("pythonpath", [None, "", "/their/lib"], ids=["unset", "empty", "set"])
def test_workers_without_torch_puts_a_torch_that_refuses_first_and_restores_the_environment(pythonpath, monkeypatch):
    from dlopt.targets.tvm import workers_without_torch

    if pythonpath is None:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    else:
        monkeypatch.setenv("PYTHONPATH", pythonpath)
    before = dict(os.environ)
    with workers_without_torch():
        inside = os.environ["PYTHONPATH"].split(os.pathsep)
        child = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert inside[1:] == ([pythonpath] if pythonpath else []) and not Path(inside[0]).exists()
    assert child.returncode == 1 and child.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: torch is hidden from TVM's worker processes by dlopt "
        "(dlopt.targets.tvm.workers_without_torch): they never convert torch tensors")
    assert dict(os.environ) == before
