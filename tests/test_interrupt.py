"""SIGINT/SIGTERM leave nothing behind; two compiles into one folder never interleave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import models
from cli import DLOPT
from serving import dlopt_in


def _start(tmp, out, *extra):
    model = tmp / "m.onnx"
    if not model.exists():
        models.save(models.conv_bn_relu(channels=32, size=64), model)
    # many timed runs keep the compile busy long enough to be interrupted mid-way
    return subprocess.Popen([DLOPT, "compile", str(model), "-o", str(out), "--precision", "fp32",
                             "--runs", "1000000", *extra], cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_staging(tmp, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(".out.dlopt-tmp-") for p in tmp.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("compile never started staging")


@pytest.fixture(scope="module")
def here(tmp_path_factory):
    """--target/--targets-file of a CPU that builds ONNX Runtime only, its file outside every tmp_path (whose
    listing is asserted): what is checked is the signal handling and the staging folder, which every backend
    shares (test_signal_builds.py sends signals into each native build); the cpu preset added an OpenVINO and
    a TVM build of this 32-channel model to every compile."""
    targets = tmp_path_factory.mktemp("targets") / "here.toml"
    targets.write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    return ("--target", "here", "--targets-file", str(targets))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_leaves_no_output(tmp_path, sig, here):
    proc = _start(tmp_path, tmp_path / "out", *here)
    _wait_for_staging(tmp_path, proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    # the handler runs when the interpreter regains control: a TVM/LLVM build in progress finishes first,
    # which took over 60 s once on a loaded 2-core AVX2 machine
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no output, temp folder or lock


def test_second_compile_into_same_folder_fails_clearly_then_waits(tmp_path, tmp_path_factory, here):
    # the three compiles target a CPU that builds ONNX Runtime only: the lock and the wait are the same for every
    # backend, and the cpu preset added an OpenVINO and a TVM build of the model to the waiting one.
    # The first holds the lock asleep in its metric (WAIT), not timing a million runs on a core of its own; the
    # metric's module and the file it writes on arriving are outside tmp_path.  The lock, not the work, keeps the
    # others out, so the model is a small one and 3 feeds evaluate it; the refused second compile runs in this
    # process (tests/serving.py dlopt_in: the console script's command, lock check and exit mapping), the
    # first (signalled) and the waiting one are processes of their own.
    metric = tmp_path_factory.mktemp("wait-metric")
    (metric / "waitmetric.py").write_text(METRIC)
    models.save(models.conv_bn_relu(channels=8, size=16), tmp_path / "m.onnx")
    path = os.pathsep.join(filter(None, [str(metric), os.environ.get("PYTHONPATH")]))
    first = subprocess.Popen([DLOPT, "compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--precision",
                              "fp32", "--runs", "5", "--samples", "3", "--no-cache", "--metric", "waitmetric:wait",
                              *here], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": path, "DLOPT_TEST_HOLDING": str(metric / "holding")})
    try:
        _wait_holding(metric, first)
        _wait_for_staging(tmp_path, first)
        second = dlopt_in("compile", tmp_path / "m.onnx", "-o", tmp_path / "out", "--precision", "fp32", "--runs",
                          "5", "--samples", "3", *here, cwd=tmp_path)
        assert second.returncode == 2
        assert f"another dlopt compile (pid {first.pid}) is writing" in second.stderr
        # a waiting compile proceeds once the first one is gone, and writes a complete folder
        waiter = subprocess.Popen([DLOPT, "compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"),
                                   "--precision", "fp32", "--runs", "5", "--samples", "3", "--wait", "120", *here],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting for the lock
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    _, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["chosen"] == "ort/fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out"]


# A user metric (--metric MODULE:FUNCTION) is Python called in the middle of a candidate's build and
# judging, so it can stand for native code: SWALLOW catches the KeyboardInterrupt the way TVM's C++
# turns it into an ordinary error; HOLD keeps the main thread in C (GIL released) the way an OpenVINO or
# TVM build does, without returning to Python: glibc's sigwait() retries when a handled signal (the
# SIGTERM) interrupts it, and waits for a SIGUSR2 that never comes, using no CPU (PBKDF2 spun a core for the
# whole grace period); WAIT sleeps in Python, the output's lock held, until a signal ends it.  The
# original's score is the metric's first call; the candidate's is its second.
METRIC = '''
import ctypes, os, pathlib, signal, time
calls = []

def swallow(outputs, labels):
    calls.append(1)
    if len(calls) == 2:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler runs here, and its KeyboardInterrupt is caught
        except BaseException:
            pass
    return 1.0

def wait(outputs, labels):
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path(os.environ["DLOPT_TEST_HOLDING"]).write_text("")
        time.sleep(600)  # the candidate's judging, with the output's lock held, until a signal ends it
    return 1.0

def hold(outputs, labels):
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path("holding").write_text("")
        libc = ctypes.CDLL(None, use_errno=True)  # CDLL releases the GIL around the call
        wanted = ctypes.create_string_buffer(128)  # a sigset_t holding SIGUSR2 alone
        libc.sigemptyset(wanted)
        libc.sigaddset(wanted, signal.SIGUSR2)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        received = ctypes.c_int()
        libc.sigwait(wanted, ctypes.byref(received))  # never returns: only the grace exit ends it
    return 1.0
'''


def _metric_compile(tmp, metric):
    models.save(models.conv_bn_relu(channels=8, size=16), tmp / "m.onnx")
    (tmp / "usermetric.py").write_text(METRIC)
    (tmp / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    path = os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))  # where --metric imports from
    return subprocess.Popen([DLOPT, "compile", "m.onnx", "-o", "out", "--target", "here", "--targets-file", "t.toml",
                             "--precision", "fp32", "--runs", "5", "--no-cache", "--metric", f"usermetric:{metric}"],
                            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": path})


def _left(tmp):
    return sorted(p.name for p in tmp.iterdir() if p.name not in ("m.onnx", "usermetric.py", "t.toml", "holding",
                                                                 "__pycache__"))


def test_an_interrupt_swallowed_by_code_it_landed_in_still_ends_the_compile(tmp_path):
    """Before: the candidate was judged, timed and published (exit 0) with both signals ignored."""
    proc = _metric_compile(tmp_path, "swallow")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "dlopt: interrupted; nothing was written"
    assert _left(tmp_path) == []  # no output, staging folder or lock


def _wait_holding(tmp, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not (tmp / "holding").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the metric never ran"
        time.sleep(0.05)


def test_sigterm_while_native_code_holds_the_main_thread_exits_after_the_grace_period(tmp_path):
    """Before: the handler waited for the C call (a minute here, unbounded in general)."""
    from dlopt.core.progress import GRACE_S

    proc = _metric_compile(tmp_path, "hold")
    _wait_holding(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "dlopt: interrupted; nothing was written"
    assert GRACE_S - 0.5 <= took < GRACE_S + 10, took
    print(f"SIGTERM during a C call: exit 130 after {took:.2f} s (grace {GRACE_S:g} s)")
    assert _left(tmp_path) == []  # the hard exit removed the staging folder and the lock


def test_a_second_signal_exits_at_once(tmp_path):
    from dlopt.core.progress import GRACE_S

    proc = _metric_compile(tmp_path, "hold")
    _wait_holding(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert took < GRACE_S - 1, took
    print(f"a second signal during a C call: exit 130 after {took:.2f} s")
    assert _left(tmp_path) == []
