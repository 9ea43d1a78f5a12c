"""Issue 23, items 10, 21 and 22: sweep names that are paths or listed twice are refused before anything is
compiled (one line, exit 2, nothing written in or outside the sweep's folder); a local Ray listens on loopback
only; Ray failing to start is one line.  The refusals run ``dlopt sweep`` in this process (its checks, messages and
exit codes, without an interpreter's start-up each); Ray failing to start runs the installed dlopt as a process."""

from __future__ import annotations

import os
import subprocess

import pytest

import models
from cli import DLOPT
from serving import dlopt_here
from dlopt.core.errors import ConfigError, TargetUnavailable
from dlopt.workflows.sweep import load_sweep, run_sweep

TARGETS = '[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["fp32"]\n'
SWEEP = """
[sweep]
models = ["m.onnx"]
targets = [{targets}]
out = "nightly"
targets-file = "targets.toml"

[options]
runs = 3
warmup = 1
samples = 2
{variants}
"""


def _write(root, *, targets='"here"', variants='[variants.fp32]\nprecision = "fp32"\n'):
    models.save(models.conv_bn_relu(channels=4, size=8), root / "m.onnx")
    (root / "targets.toml").write_text(TARGETS)
    (root / "sweep.toml").write_text(SWEEP.format(targets=targets, variants=variants))
    return root / "sweep.toml"


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/dlopt-sweep-absolute", "a/b", "..", ".hidden", "a b",
                                  "a\\\\b", ""])
def test_a_variant_name_that_is_a_path_is_refused(tmp_path, name):
    (tmp_path / "w").mkdir()
    sweep = _write(tmp_path / "w", variants=f'[variants."{name}"]\nprecision = "fp32"\n')
    before = _files(tmp_path)
    status, stderr = dlopt_here("sweep", sweep, "--ray")
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "cannot be a folder name under the sweep's out" in stderr
    assert _files(tmp_path) == before  # nothing compiled, in or outside the folder


def test_a_target_name_that_is_a_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"target name '\.\./here' cannot be a folder name"):
        load_sweep(_write(tmp_path, targets='"../here"'))


@pytest.mark.parametrize("targets, variants, message", [
    ('"here", "here"', '[variants.fp32]\nprecision = "fp32"\n', "target 'here' twice"),
    ('"here"', '[variants.fp32]\nprecision = "fp32"\n[variants.FP32]\nprecision = "fp32"\n', "variant 'fp32' and 'FP32'"),
])
def test_an_entry_listed_twice_is_refused(tmp_path, targets, variants, message):
    sweep = _write(tmp_path, targets=targets, variants=variants)
    before = _files(tmp_path)
    status, stderr = dlopt_here("sweep", sweep, "--ray")
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr and "would compile into one folder; list it once" in stderr
    assert _files(tmp_path) == before


def test_a_local_ray_listens_on_loopback_only(tmp_path):
    pytest.importorskip("ray", reason="sweeps on Ray need ray (pip install 'dlopt[ray]')")
    psutil = pytest.importorskip("psutil", reason="listing Ray's listening sockets needs psutil")
    listening = set()

    def on_row(row):  # the entry is done; the local Ray and its processes still run
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                listening.update((proc.name(), c.laddr.ip) for c in proc.net_connections(kind="inet")
                                 if c.status == psutil.CONN_LISTEN)
            except psutil.Error:
                pass

    result = run_sweep(load_sweep(_write(tmp_path)), ray=True, num_cpus=1, on_row=on_row)
    assert [r.status for r in result.rows] == ["ok"]
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening


def test_ray_failing_to_start_is_one_line(tmp_path):
    pytest.importorskip("ray", reason="sweeps on Ray need ray (pip install 'dlopt[ray]')")
    sweep = _write(tmp_path)
    (tmp_path / "not-a-folder").write_text("mine")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "not-a-folder" / "ray")}
    done = subprocess.run([DLOPT, "sweep", str(sweep), "--ray", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == TargetUnavailable.exit_code and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--ray: cannot start a local Ray (NotADirectoryError" in done.stderr.splitlines()[-1]
    assert "internal error" not in done.stderr and (tmp_path / "not-a-folder").read_text() == "mine"


@pytest.mark.parametrize("file", ["...onnx", ".hidden.onnx", "a b.onnx"])
def test_a_model_whose_name_is_not_a_plain_folder_name_is_refused(tmp_path, file):
    """A model file named '...onnx' has the stem '..': its entries compiled into here/<variant>/, outside the
    sweep's out (exit 0)."""
    (tmp_path / "w").mkdir()
    sweep = _write(tmp_path / "w")
    os.rename(tmp_path / "w" / "m.onnx", tmp_path / "w" / file)
    sweep.write_text(sweep.read_text().replace('"m.onnx"', f'"{file}"'))
    before = _files(tmp_path)
    status, stderr = dlopt_here("sweep", sweep)
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"model name {file[:-5]!r} cannot be a folder name under the sweep's out" in stderr
    assert "rename the file" in stderr
    assert _files(tmp_path) == before  # nothing compiled, in or outside the folder


def test_two_models_with_one_name_are_refused(tmp_path):
    sweep = _write(tmp_path)
    (tmp_path / "other").mkdir()
    models.save(models.conv_bn_relu(channels=4, size=8), tmp_path / "other" / "M.onnx")
    sweep.write_text(sweep.read_text().replace('"m.onnx"', '"m.onnx", "other/M.onnx"'))
    before = _files(tmp_path)
    status, stderr = dlopt_here("sweep", sweep)
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "model 'm' and 'M': both entries would compile into one folder" in stderr
    assert _files(tmp_path) == before


def test_an_entry_folder_that_resolves_outside_the_sweep_is_refused(tmp_path):
    """OUT/<model> a link to a folder elsewhere: every folder a sweep writes must resolve inside OUT."""
    (tmp_path / "w").mkdir()
    sweep = _write(tmp_path / "w")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "w" / "nightly").mkdir()
    (tmp_path / "w" / "nightly" / "m").symlink_to(tmp_path / "elsewhere")
    before = _files(tmp_path)
    status, stderr = dlopt_here("sweep", sweep)
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "nightly/m/here/fp32 resolves outside the sweep's out" in stderr
    assert _files(tmp_path) == before and os.listdir(tmp_path / "elsewhere") == []
