"""targets/executorch_native.py: a .pte run without torch, by a C library over the executorch wheel's runtime.

Built here for x86_64 and compared with ExecuTorch's own Python bindings; built for aarch64 against the
aarch64 wheel in the emulated environment (``make arm64-env``) and run there under qemu-aarch64 on a
Cortex-A76 (the rpi5's core), by a script that imports the module copied beside it (no dlopt there).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from dlopt.device.emulation import aarch64_python, arm64_env_root, qemu_cpu_models, run_emulated
from dlopt.targets import executorch_native, executorch_plain
from dlopt.targets.executorch_native import LIBRARY, RUNTIME_LIBRARIES, PteNative, build, folder_size

torch = pytest.importorskip("torch")
pytest.importorskip("executorch.runtime")

SITE = Path(sysconfig.get_paths()["purelib"])
CROSS = "aarch64-linux-gnu-g++"
EMULATED = aarch64_python()

# Runs under the emulated aarch64 Python: only numpy and the module file beside it.
EMULATED_SCRIPT = """\
import json, sys, time
import numpy as np
from executorch_plain import PteNative
folder, feeds = sys.argv[1], np.load(sys.argv[2])
result = {}
for name in sys.argv[3:]:
    runner = PteNative(folder, name, threads=2)
    started = time.perf_counter()
    outputs = runner.run([feeds["x"]])
    result[name] = {"outputs": [o.tolist() for o in outputs], "run_s": time.perf_counter() - started,
                    "inputs": [[str(d), list(s)] for d, s in runner.inputs()], "threads": runner.threads}
    runner.close()
print(json.dumps(result))
"""


def lowered(module, example) -> bytes:
    """``module`` as a .pte through XNNPACK: torch.export, then to_edge_transform_and_lower."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(module, example)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def quantised(module, example, calibration) -> torch.nn.Module:
    """PT2E int8: XNNPACK's symmetric per-channel quantizer, calibrated on ``calibration``."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, example).module(), quantizer)
    for batch in calibration:
        prepared(batch)
    return convert_pt2e(prepared)


class TwoInputs(torch.nn.Module):
    """Float and int64 inputs, a bool output: operators outside XNNPACK, in the kernel libraries."""

    def forward(self, x, k):
        return torch.relu(x) * 2, k + 1, x.sum() > 0


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """A small CNN as fp32 and int8 .pte files, a two-input program, and the input they share."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pte")
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    x = torch.randn(1, 1, 28, 28)
    (folder / "m.pte").write_bytes(lowered(cnn, (x,)))
    int8 = quantised(cnn, (x,), [torch.randn(1, 1, 28, 28) for _ in range(8)])
    (folder / "q.pte").write_bytes(lowered(int8, (x,)))
    (folder / "two.pte").write_bytes(lowered(TwoInputs(), (torch.randn(2, 3), torch.arange(4))))
    return folder, x


@pytest.fixture(scope="module")
def x86(programs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("x86")
    library = build(SITE, folder, "x86_64")
    for pte in programs[0].glob("*.pte"):
        shutil.copy(pte, folder)
    return library


def reference(path: Path, inputs: list) -> list[np.ndarray]:
    """What ExecuTorch's Python bindings compute."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return [o.numpy() if hasattr(o, "numpy") else np.asarray(o) for o in method.execute(inputs)]


def test_x86_build_holds_the_library_and_the_five_runtime_libraries(x86):
    folder = x86.parent
    assert x86.name == LIBRARY
    assert sorted(p.name for p in folder.glob("*.so")) == sorted([LIBRARY, *RUNTIME_LIBRARIES])
    assert 5e6 < folder_size(folder) - sum(p.stat().st_size for p in folder.glob("*.pte")) < 40e6


@pytest.mark.parametrize("name, tolerance", [("m.pte", 1e-6), ("q.pte", 1e-6)])
def test_x86_output_matches_executorch_pybindings(x86, programs, name, tolerance):
    x = programs[1]
    with PteNative(x86.parent, name, threads=2) as runner:
        assert runner.inputs() == [(np.dtype(np.float32), (1, 1, 28, 28))]
        assert runner.threads == 2
        first = runner.run([x.numpy()])
        again = runner.run([x.numpy()])
    expected = reference(x86.parent / name, [x])
    assert len(first) == 1 and first[0].shape == (1, 10) and first[0].dtype == np.float32
    np.testing.assert_allclose(first[0], expected[0], rtol=0, atol=tolerance)
    np.testing.assert_array_equal(first[0], again[0])  # outputs are copies, not the next run's buffers


def test_a_copy_of_the_module_runs_without_dlopt_and_prints_nothing(x86, tmp_path):
    shutil.copy(executorch_plain.__file__, tmp_path / "executorch_plain.py")
    script = ("import sys; sys.modules['dlopt'] = None\n"  # any dlopt import fails
              "import numpy as np, executorch_plain as en\n"
              "runner = en.PteNative(sys.argv[1], 'm.pte', threads=1)\n"
              "print(runner.run([np.ones((1, 1, 28, 28), np.float32)])[0].shape, runner.threads)")
    done = subprocess.run([sys.executable, "-c", script, str(x86.parent)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "(1, 10) 1\n", "")  # no runtime info lines


def test_int64_and_bool_inputs_and_outputs_match_pybindings(x86):
    x, k = torch.randn(2, 3), torch.arange(4)
    with PteNative(x86.parent, "two.pte") as runner:
        assert runner.inputs() == [(np.dtype(np.float32), (2, 3)), (np.dtype(np.int64), (4,))]
        got = runner.run([x.numpy(), k.numpy()])
    expected = reference(x86.parent / "two.pte", [x, k])
    assert [o.dtype for o in got] == [np.float32, np.int64, np.bool_]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_wrong_inputs_and_programs_are_one_line_errors(x86, tmp_path):
    with PteNative(x86.parent, "m.pte") as runner:
        with pytest.raises(RuntimeError, match=r"input 0 is float32\[1, 1, 27, 28\]; forward takes "
                                               r"float32\[1, 1, 28, 28\]"):
            runner.run([np.zeros((1, 1, 27, 28), np.float32)])
        with pytest.raises(RuntimeError, match=r"input 0 is float64\[1, 1, 28, 28\]"):
            runner.run([np.zeros((1, 1, 28, 28))])
        with pytest.raises(RuntimeError, match="forward takes 1 inputs, got 2"):
            runner.run([np.zeros((1, 1, 28, 28), np.float32)] * 2)
        assert runner.run([np.zeros((1, 1, 28, 28), np.float32)])[0].shape == (1, 10)  # still usable
    bad = x86.parent / "bad.pte"
    bad.write_bytes(b"not a program" * 8)
    with pytest.raises(RuntimeError) as caught:
        PteNative(x86.parent, "bad.pte")
    assert str(caught.value) == (f"ExecuTorch: cannot load method forward of {bad}: InvalidProgram (0x23): "
                                 "Program identifier 'a pr' != expected 'ET12'")  # the runtime's logged reason
    with pytest.raises(OSError, match="no ExecuTorch program"):
        PteNative(x86.parent, "absent.pte")


def test_build_without_a_wheel_or_a_compiler_says_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(OSError, match=r"no executorch wheel .* pip install executorch==1\.5\.1") as caught:
        build(tmp_path, tmp_path / "out", "x86_64")
    assert "\n" not in str(caught.value)
    if shutil.which(CROSS) is not None:
        with pytest.raises(OSError, match=r"the executorch wheel in .* is for x86_64, not aarch64"):
            build(SITE, tmp_path / "out", "aarch64")
    monkeypatch.setattr(executorch_native.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match=f"no {re.escape(CROSS)} .*; apt-get install g\\+\\+-aarch64-linux-gnu"):
        build(SITE, tmp_path / "out", "aarch64")


@pytest.mark.skipif(shutil.which(CROSS) is None, reason=f"{CROSS} not installed (apt-get install g++-aarch64-linux-gnu)")
@pytest.mark.skipif(isinstance(EMULATED, str), reason=str(EMULATED))
def test_aarch64_build_under_emulation_matches_x86(x86, programs, tmp_path):
    site = arm64_env_root() / "site"
    if not (site / "executorch" / "lib").is_dir():
        pytest.skip(f"no aarch64 executorch wheel in {site}: run `make arm64-env`")
    folder = tmp_path / "board"
    build(site, folder, "aarch64")
    for name in ("m.pte", "q.pte"):
        shutil.copy(x86.parent / name, folder)
    shutil.copy(executorch_plain.__file__, folder / "executorch_plain.py")
    (folder / "run.py").write_text(EMULATED_SCRIPT)
    x = programs[1].numpy()
    np.savez(folder / "feeds.npz", x=x)
    cpu = "cortex-a76" if "cortex-a76" in qemu_cpu_models() else None
    done = run_emulated(folder / "run.py", [folder, "feeds.npz", "m.pte", "q.pte"], cwd=folder, timeout=180, cpu=cpu)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "executorch:" not in done.stderr  # the runtime's info lines are dropped there too
    result = json.loads(done.stdout.splitlines()[-1])
    with PteNative(x86.parent, "m.pte", threads=2) as fp32, PteNative(x86.parent, "q.pte", threads=2) as int8:
        native = {"m.pte": fp32.run([x]), "q.pte": int8.run([x])}
    for name, outputs in native.items():
        assert result[name]["inputs"] == [["float32", [1, 1, 28, 28]]] and result[name]["threads"] == 2
        np.testing.assert_allclose(np.array(result[name]["outputs"][0], np.float32), outputs[0], rtol=0, atol=1e-5)
    print(f"aarch64 under qemu ({cpu or 'max'}): one run of m.pte {result['m.pte']['run_s'] * 1e3:.1f} ms, "
          f"q.pte {result['q.pte']['run_s'] * 1e3:.1f} ms", file=sys.stderr)
