"""dlopt never deletes or overwrites what it did not write (issue 9: defects 1, 4, 5, 11)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import onnx
import pytest

import models
from cli import DLOPT
from serving import dlopt_here

FAST = ("--precision", "fp32", "--runs", "5", "--samples", "3")
# The compiles these tests run to the end (or keep busy until they are stopped) target a CPU that builds
# ONNX Runtime only: what they check is the output folder, its lock and its staging, which every backend
# shares; the cpu preset would add an OpenVINO and a TVM build to each (about 10 s of a 2-core machine).
ORT_ONLY = '[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n'


@pytest.fixture(scope="module")
def here(tmp_path_factory):
    """--target/--targets-file arguments of the ORT-only target, its file outside every test's folder."""
    path = tmp_path_factory.mktemp("targets") / "here.toml"
    path.write_text(ORT_ONLY)
    return ("--target", "here", "--targets-file", str(path))


def _tiny(path):
    return models.save(models.conv_bn_relu(channels=4, size=8), path)


def _here(*args, cwd):
    """`dlopt ARGS` run from ``cwd`` in this process (tests/serving.py ``dlopt_here``: the same command, checks and
    error-to-exit-code mapping as the console script, without its start-up), as (returncode, stderr)."""
    with contextlib.chdir(cwd):
        code, err = dlopt_here(*args)
    return SimpleNamespace(returncode=code, stderr=err)


def _compiled(model, out, here, cwd):
    """A finished compile of ``model`` to ``out`` (relative to ``cwd``) on the ORT-only target: the Python API in this
    process, with FAST's settings; its Report."""
    import dlopt as api

    with contextlib.chdir(cwd):
        return api.compile(model, target=here[1], targets_file=here[3], out=out, precision="fp32", runs=5, samples=3,
                           progress=False)


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_error_line(result, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlopt: error: "), result.stderr
    assert "Traceback" not in result.stderr and "\x1b[" not in result.stderr
    return lines[0]


def test_folder_with_a_foreign_manifest_is_not_replaced(tmp_path):
    # the reproduction from the issue: a project folder that happens to hold a manifest.json
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "manifest.json").write_text("{}")
    (proj / "thesis.tex").write_text("three years of work")
    (proj / "src" / "main.c").write_text("int main(void) { return 0; }")
    _tiny(proj / "tiny.onnx")
    before = {p: p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    line = _one_error_line(_here("compile", "tiny.onnx", "-o", ".", *FAST, cwd=proj))
    assert "is not a dlopt output (no dlopt manifest): manifest.json, src, thesis.tex, tiny.onnx" in line
    assert {p: p.read_bytes() for p in proj.rglob("*") if p.is_file()} == before
    assert _tree(proj) == ["manifest.json", "src", "src/main.c", "thesis.tex", "tiny.onnx"]


def test_input_model_inside_a_dlopt_output_is_never_replaced(tmp_path, here):
    _tiny(tmp_path / "m.onnx")
    _compiled("m.onnx", "out", here, tmp_path)
    model = tmp_path / "out" / "model.onnx"
    before = model.read_bytes()
    line = _one_error_line(_here("compile", model, "-o", tmp_path / "out", *FAST, cwd=tmp_path))
    assert "holds the input" in line and model.read_bytes() == before


def test_planted_lock_symlink_is_not_followed(tmp_path):
    _tiny(tmp_path / "m.onnx")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.dlopt-lock").symlink_to(victim)
    line = _one_error_line(_here("compile", "m.onnx", "-o", "out", *FAST, cwd=tmp_path))
    assert "is a symlink or not a file" in line
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()


def test_foreign_file_at_the_lock_path_is_not_overwritten(tmp_path):
    _tiny(tmp_path / "m.onnx")
    (tmp_path / ".out.dlopt-lock").write_text("my notes")
    line = _one_error_line(_here("compile", "m.onnx", "-o", "out", *FAST, cwd=tmp_path))
    assert "is not a dlopt lock file" in line
    assert (tmp_path / ".out.dlopt-lock").read_text() == "my notes"


def test_dangling_symlink_as_output_is_refused(tmp_path):
    _tiny(tmp_path / "m.onnx")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    line = _one_error_line(_here("compile", "m.onnx", "-o", "link", *FAST, cwd=tmp_path))
    assert "is a symlink to" in line and "which does not exist" in line
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "link").is_symlink()


def _start_slow(tmp, out, here):
    return subprocess.Popen([DLOPT, "compile", "m.onnx", "-o", str(out), "--precision", "fp32",
                             "--runs", "1000000", *here], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(tmp, prefix, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in tmp.iterdir() if p.name.startswith(prefix)]
        if found:
            return found
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"no {prefix}* appeared")


# The candidate's score (a --metric's second call) sleeps until a signal ends it: the compile holds its output's
# lock without timing a million runs on a core while another compile is tried against it.
WAIT_METRIC = '''
import os, pathlib, time
calls = []

def wait(outputs, labels):
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path(os.environ["DLOPT_TEST_HOLDING"]).write_text("")
        time.sleep(600)
    return 1.0
'''


def test_link_and_its_target_share_one_lock(tmp_path, tmp_path_factory, here):
    _tiny(tmp_path / "m.onnx")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    metric = tmp_path_factory.mktemp("wait-metric")
    (metric / "waitmetric.py").write_text(WAIT_METRIC)
    path = os.pathsep.join(filter(None, [str(metric), os.environ.get("PYTHONPATH")]))
    first = subprocess.Popen([DLOPT, "compile", "m.onnx", "-o", "real", *FAST, "--no-cache", "--metric",
                              "waitmetric:wait", *here], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": path,
                                             "DLOPT_TEST_HOLDING": str(metric / "holding")})
    try:
        _wait_for(metric, "holding", first, timeout=240)
        _wait_for(tmp_path, ".real.dlopt-tmp-", first)
        line = _one_error_line(_here("compile", "m.onnx", "-o", "link", *FAST, cwd=tmp_path))
        assert f"another dlopt compile (pid {first.pid}) is writing {tmp_path / 'real'}" in line
    finally:
        first.kill()
        first.communicate()


def test_killed_run_leaves_staging_that_the_next_run_removes(tmp_path, here):
    _tiny(tmp_path / "m.onnx")
    proc = _start_slow(tmp_path, "out", here)
    (staging,) = _wait_for(tmp_path, ".out.dlopt-tmp-", proc)
    assert staging.name.startswith(f".out.dlopt-tmp-{proc.pid}-")
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate()
    assert staging.is_dir()
    other = tmp_path / ".other.dlopt-tmp-1-abc"  # another output's staging is not ours to remove
    other.mkdir()
    notes = _compiled("m.onnx", "out", here, tmp_path).notes
    assert not staging.exists() and other.is_dir()
    assert f"removed {staging.name}, left by an earlier compile that was killed" in notes
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.dlopt-tmp-1-abc", "m.onnx", "out"]


def test_two_quick_interrupts_clean_up_once_and_quietly(tmp_path, here):
    _tiny(tmp_path / "m.onnx")
    proc = _start_slow(tmp_path, "out", here)
    _wait_for(tmp_path, ".out.dlopt-tmp-", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["dlopt: interrupted; nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_output_name_too_long_fails_before_any_work(tmp_path):
    _tiny(tmp_path / "m.onnx")
    start = time.monotonic()
    line = _one_error_line(_here("compile", "m.onnx", "-o", "x" * 240, *FAST, cwd=tmp_path))
    assert "is too long (240 characters)" in line
    assert time.monotonic() - start < 20 and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_api_default_output_name_stays_in_the_working_folder(tmp_path, monkeypatch, here):
    import dlopt

    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    proto = models.conv_bn_relu(channels=4, size=8)
    proto.graph.name = "../../escaped"
    # the default name is <graph name>-<target>: the ORT-only target "here" (its file outside tmp_path)
    report = dlopt.compile(proto, target=here[1], targets_file=here[3], precision="fp32", runs=3, samples=2)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.parent == work) == ["escaped-here"]
    assert report.output_dir == str(work / "escaped-here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("graph_name", ["", "..", "/etc/passwd", "a\nb"])
def test_plain_name(graph_name):
    from dlopt.core.config import plain_name

    name = plain_name(f"{graph_name}-cpu")
    assert name and "/" not in name and "\n" not in name and not name.startswith(".")


def test_model_file_is_still_there_after_every_refusal(tmp_path):
    path = _tiny(tmp_path / "m.onnx")
    data = onnx.load(path).SerializeToString()
    for args in (("-o", "."), ("-o", "m.onnx"), ("--threads", "100000")):
        assert _here("compile", "m.onnx", *args, *FAST, cwd=tmp_path).returncode == 2
    assert onnx.load(path).SerializeToString() == data
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path, here):
    _tiny(tmp_path / "m.onnx")
    _compiled("m.onnx", "deep/a/b", here, tmp_path)
    assert (tmp_path / "deep" / "a" / "b" / "manifest.json").is_file()
    # a compile that fails after the folders were made (the model fails at run time) leaves none of them
    from test_hostile_inputs import _reshape_to_seven

    models.save(_reshape_to_seven(), tmp_path / "bad.onnx")
    result = _here("compile", "bad.onnx", "-o", "other/x", *FAST, *here, cwd=tmp_path)
    assert result.returncode == 2 and "cannot run the original model" in result.stderr
    assert not (tmp_path / "other").exists()
