"""dlopt.device.emulation on a real qemu-aarch64: what a missing environment says, a script on the
emulated aarch64, and the rpi5 TVM library run there against ONNX Runtime on this host."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dlopt.device.emulation import ARM64_ENV_VAR, EmulatedPython, aarch64_python, arm64_env_root, run_emulated
from dlopt.core.errors import TargetUnavailable

EMULATED = aarch64_python()
needs_arm64 = pytest.mark.skipif(isinstance(EMULATED, str), reason=str(EMULATED))
CROSS = "aarch64-linux-gnu-gcc"

PROBE = """\
import os, platform, sys
import numpy as np
import tvm
print(platform.machine(), np.arange(10).sum(), tvm.__version__, int(tvm.get_global_func("runtime.NumThreads")()))
print(os.getcwd())
print(sys.argv[1:])
"""

# Runs the library on every feed of feeds.npz (inputs in model order) and saves the stacked outputs.
RUNNER = """\
import json, sys
import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine
library, feeds_path, out_path = sys.argv[1:]
feeds = np.load(feeds_path)
names = json.loads(str(feeds["__names__"]))
main = VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())["main"]
outputs = [main(*[tvm.runtime.tensor(feeds[n][i]) for n in names]) for i in range(len(feeds[names[0]]))]
np.save(out_path, np.stack([o.numpy() if hasattr(o, "numpy") else o[0].numpy() for o in outputs]))
"""


def test_default_root_is_the_venvs_arm64_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(ARM64_ENV_VAR, raising=False)
    assert arm64_env_root() == Path(sys.prefix) / "arm64"
    monkeypatch.setenv(ARM64_ENV_VAR, str(tmp_path))
    assert arm64_env_root() == tmp_path


def test_empty_environment_names_what_is_missing_and_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv(ARM64_ENV_VAR, str(tmp_path))
    reason = aarch64_python()
    assert isinstance(reason, str) and "\n" not in reason
    assert str(tmp_path / "sysroot" / "usr" / "bin" / "python3.11") in reason
    assert f"tvm, tvm_ffi, numpy in {tmp_path / 'site'}" in reason
    assert "make arm64-env" in reason and ARM64_ENV_VAR in reason
    with pytest.raises(TargetUnavailable) as raised:
        run_emulated(tmp_path / "script.py", [], cwd=tmp_path, timeout=10)
    assert str(raised.value) == reason


def test_partial_environment_and_missing_qemu(monkeypatch, tmp_path):
    python = tmp_path / "sysroot" / "usr" / "bin" / "python3.11"
    python.parent.mkdir(parents=True)
    python.write_bytes(b"")
    (tmp_path / "site" / "numpy").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no qemu-aarch64 on it
    reason = aarch64_python(tmp_path)
    assert isinstance(reason, str)
    assert "qemu-aarch64 (apt-get install qemu-user)" in reason
    assert "python3.11" not in reason
    assert f"tvm, tvm_ffi in {tmp_path / 'site'}" in reason


@needs_arm64
def test_script_runs_on_aarch64_with_numpy_and_the_tvm_runtime(tmp_path):
    assert isinstance(EMULATED, EmulatedPython) and EMULATED.label == "qemu-aarch64 emulation"
    assert EMULATED.env["TVM_USE_RUNTIME_LIB"] == "1" and Path(EMULATED.command[0]).name == "qemu-aarch64"
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = run_emulated(script, ["a b", 3], cwd=tmp_path, timeout=120, threads=1)
    assert done.returncode == 0, done.stderr[-2000:]
    machine, total, version, threads = done.stdout.splitlines()[0].split()
    assert (machine, total, threads) == ("aarch64", "45", "1")
    assert version.startswith("0.")
    assert done.stdout.splitlines()[1:] == [str(tmp_path), "['a b', '3']"]


@needs_arm64
def test_timeout_and_unknown_cpu_are_one_line_errors(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(TargetUnavailable, match=r"^slow\.py did not finish within 2 s under qemu-aarch64") as raised:
        run_emulated(script, [], cwd=tmp_path, timeout=2)
    assert "\n" not in str(raised.value)
    with pytest.raises(TargetUnavailable, match=r"cannot emulate a cortex-z99; it knows .*cortex-a76"):
        run_emulated(script, [], cwd=tmp_path, timeout=2, cpu="cortex-z99")


@needs_arm64
@pytest.mark.skipif(shutil.which(CROSS) is None, reason=f"{CROSS} not installed (apt-get install gcc-aarch64-linux-gnu)")
def test_rpi5_tvm_library_on_an_emulated_cortex_a76_matches_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    import json

    import models
    import onnx_ir as ir
    from helpers import max_rel_error, run_ort

    from dlopt.passes import generic_passes
    from dlopt.core.pipeline import run_pipeline
    from dlopt.core.profiles import resolve_target
    from dlopt.targets.tvm import backend

    proto = models.conv_bn_relu(channels=8, size=16)
    # As `dlopt compile` lowers it: generic passes (BN folded into the conv), then TVM's own.
    model = run_pipeline(ir.serde.deserialize_model(proto),
                         generic_passes() + backend.BACKEND.lowering_passes("fp32")).model
    artifact = backend.BACKEND.compile(model, resolve_target("rpi5"), tmp_path / "rpi5", precision="fp32", threads=4)
    library = artifact.entry_path.read_bytes()
    assert int.from_bytes(library[18:20], "little") == 183  # ELF e_machine: aarch64
    feeds = np.random.default_rng(0).standard_normal((3, 1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", __names__=json.dumps(["x"]), x=feeds)
    (tmp_path / "runner.py").write_text(RUNNER)

    done = run_emulated(tmp_path / "runner.py", [artifact.entry_path, "feeds.npz", "outputs.npy"], cwd=tmp_path,
                        timeout=120, threads=1, cpu="cortex-a76")

    assert done.returncode == 0, done.stderr[-2000:]
    outputs = np.load(tmp_path / "outputs.npy")
    assert outputs.shape == (3, 1, 10)
    for feed, output in zip(feeds, outputs, strict=True):
        reference = run_ort(proto, {"x": feed})[0]
        assert max_rel_error(reference, output) <= 1e-4
