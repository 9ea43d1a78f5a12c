"""Set-up for the presets: `make demo`/`make test` install what every preset needs, and `dlopt targets`
names, per backend that cannot build (or builds with less) here, the missing tool and its install line;
and a closed stdout pipe (`dlopt inspect M | head`) ends dlopt quietly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from onnx import TensorProto, helper

import models
from cli import DLOPT, dlopt

ROOT = Path(__file__).resolve().parent.parent
SIGPIPE_EXIT = 141  # 128 + SIGPIPE, what the shell reports for git, cat, grep ... writing into a closed pipe


def _only(tmp_path: Path, *tools: str) -> dict:
    """The environment with a PATH holding only ``tools`` (symlinks to this machine's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return {**os.environ, "PATH": str(bin_dir)}


def _targets_json(env: dict, cwd: Path) -> dict:
    result = subprocess.run([DLOPT, "targets", "--json"], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_targets_names_the_missing_cross_compilers_and_their_install_lines(tmp_path):
    env = _only(tmp_path, "gcc")  # the C backend's host check; no cross compiler, no qemu, no nvcc
    data = _targets_json(env, tmp_path)
    line = "aarch64-linux-gnu-gcc missing (apt-get install gcc-aarch64-linux-gnu)"
    for board in ("rpi5", "rpi4", "arm64", "jetson-orin", "jetson-nano"):
        assert data[board]["cannot_build"]["tvm"] == line, data[board]
        assert "tvm" not in data[board]["can_build"]
    assert data["rpi5"]["can_build"] == ["ort", "executorch"]
    assert data["rpi5"]["limited"]["executorch"] == (
        "the .pte ships without the board's runner library (the board then needs pip install executorch, which "
        "pulls torch): aarch64-linux-gnu-g++ is missing (apt-get install g++-aarch64-linux-gnu)")
    assert data["cpu"]["cannot_build"] == {} and "tvm" in data["cpu"]["can_build"]  # built with the host cc
    for mcu in ("cortex-m4", "cortex-m7"):
        assert data[mcu]["can_build"] == ["c"]  # host-verified C still builds
        assert data[mcu]["limited"]["c"] == (
            "no Cortex-M sizes or qemu check: arm-none-eabi-gcc, arm-none-eabi-size, arm-none-eabi-nm, "
            "arm-none-eabi-ld not installed (apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi)")
    table = subprocess.run([DLOPT, "targets"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    missing = _column(table.stdout, "not available here", "runs here")
    assert missing["rpi5"].startswith(f"tvm: {line}") and "executorch builds with" in missing["rpi5"]
    assert missing["cortex-m7"] == f"c builds with {data['cortex-m7']['limited']['c']}"
    assert missing["cpu"] == "-"


def _column(table: str, header: str, next_header: str) -> dict[str, str]:
    """target -> the text of one column of `dlopt targets`' table, its wrapped lines joined."""
    lines = table.splitlines()
    start, end = lines[0].index(header), lines[0].index(next_header)
    cells: dict[str, str] = {}
    target = None
    for row in lines[2:]:
        target = row.split()[0] if row[:1].strip() else target
        piece = row[start:end].strip()
        joined = cells.get(target, "")
        cells[target] = joined + ("" if not joined or joined.endswith("-") else " ") + piece if piece else joined
    return cells


def test_targets_on_this_machine_builds_every_preset_with_every_backend():
    needed = ("aarch64-linux-gnu-gcc", "arm-none-eabi-gcc", "qemu-system-arm")
    if not all(shutil.which(t) for t in needed):
        pytest.skip(f"make system-deps has not installed {', '.join(t for t in needed if not shutil.which(t))}")
    result = dlopt("targets", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["rpi5"]["can_build"] == ["ort", "tvm", "executorch"] and data["rpi5"]["cannot_build"] == {}
    assert data["rpi5"]["limited"] == {}  # g++-aarch64-linux-gnu and the arm64 environment: the board's runner too
    assert data["jetson-orin"]["can_build"] == ["tensorrt", "tvm", "ort"]
    for mcu in ("cortex-m4", "cortex-m7"):
        assert data[mcu]["can_build"] == ["c"] and data[mcu]["limited"] == {}


def test_make_demo_and_test_set_up_the_presets_system_packages():
    """`make -n` prints the recipes (sub-makes too, without running them): both verbs run `setup`, which
    installs the cross compilers and qemu before the demo or the tests."""
    for verb, last in (("demo", "dlopt demo"), ("test", "pytest")):
        result = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), verb],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        text = result.stdout
        for package in ("gcc-aarch64-linux-gnu", "gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm"):
            assert package in text, (verb, package)
        assert text.index("dpkg -s") < text.rindex(last), verb


def _wide_model(path: Path, count: int = 1500) -> Path:
    """Identity per input: `dlopt inspect` prints ~95 KB, over a pipe's 64 KB buffer."""
    names = [f"input_with_a_long_name_{i:05d}" for i in range(count)]
    nodes = [helper.make_node("Identity", [n], [f"y{i}"]) for i, n in enumerate(names)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in names]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 4]) for i in range(count)]
    return Path(models.save(models._model(nodes, inputs, outputs, []), path))


def test_a_closed_stdout_pipe_is_a_quiet_exit(tmp_path):
    model = _wide_model(tmp_path / "wide.onnx")
    # `dlopt inspect M | head -1`, with a head that reads one line and closes the pipe
    writer = subprocess.Popen([DLOPT, "inspect", str(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = subprocess.run(["head", "-1"], stdin=writer.stdout, capture_output=True, text=True, timeout=120)
    writer.stdout.close()
    stderr = writer.stderr.read().decode()
    assert writer.wait(timeout=120) == SIGPIPE_EXIT, stderr
    assert reader.stdout.startswith(str(model)) and reader.stdout.count("\n") == 1
    assert stderr == ""  # no "internal error", no traceback, no "Exception ignored" at shutdown


def test_a_pipe_closed_before_dlopt_writes_is_a_quiet_exit(tmp_path):
    """The whole output fits the pipe's buffer and is written at exit, when Python flushes stdout."""
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run([DLOPT, "targets", "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    os.close(write_end)
    assert (done.returncode, done.stderr) == (SIGPIPE_EXIT, "")
    done = subprocess.run(f"{DLOPT} inspect {model} | true", shell=True, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")  # the shell reports the last command's status


def test_a_compile_without_the_cross_compiler_says_what_dlopt_targets_says(tmp_path):
    """The compile's table names the same missing tool and install line as `dlopt targets`, from one place."""
    model = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    env = _only(tmp_path, "gcc")
    result = subprocess.run([DLOPT, "compile", str(model), "--target", "rpi5", "--precision", "fp32", "--runs", "3",
                             "-o", str(tmp_path / "out"), "--json", "-q"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {f"{c['backend']}/{c['precision']}": c for c in json.loads(result.stdout)["candidates"]}
    assert rows["tvm/fp32"]["status"] == "unavailable", rows["tvm/fp32"]
    assert rows["tvm/fp32"]["reason"] == _targets_json(env, tmp_path)["rpi5"]["cannot_build"]["tvm"]
