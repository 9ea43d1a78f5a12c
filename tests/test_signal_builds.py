"""SIGTERM while a native build runs (OpenVINO, NNCF int8, TVM) ends the compile, every time.

A signal's Python handler runs when a native build hands control back; inside a build that calls back
into Python its KeyboardInterrupt can come back as an ordinary error (TVM: a RuntimeError), which the
candidate loop counted as a failed build while both signals stayed ignored: the compile went on, and
only SIGKILL stopped it.  Each try here starts `dlopt compile` for one kind of build, sends SIGTERM at
a different moment of it, and asserts exit 130 within a bound, the one-line message, and nothing left:
no output, staging folder or lock.  DLOPT_SIGNAL_TRIES sets the tries per kind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

import models
from cli import DLOPT

TRIES = int(os.environ.get("DLOPT_SIGNAL_TRIES", "3"))  # 3 keeps make test short; the acceptance ran more
# The signal lands this many seconds after the staging folder appears, spread over each kind's build:
# on a loaded 2-core machine the OpenVINO build ran 1.4-3.8 s after it, NNCF's int8 1-9 s, TVM's 1-8.6 s.
WINDOWS = {"openvino": (0.2, 3.5), "nncf": (0.5, 8.5), "tvm": (0.5, 8.5)}
# dlopt.core.progress.GRACE_S, the unwinding, and a loaded machine
EXIT_WITHIN_S = 30.0
TARGETS = '[targets.ov]\nbase = "cpu"\nbackends = ["openvino"]\n[targets.tv]\nbase = "cpu"\nbackends = ["tvm"]\n'
# kind: (arguments, the candidate folder, whether the build runs once that folder exists (OpenVINO's
# compile) or before it appears (NNCF quantises before OpenVINO compiles; TVM exports its library last))
KINDS = {
    "openvino": (["--target", "ov", "--precision", "fp32"], "openvino-fp32", True),
    "nncf": (["--target", "ov", "--precision", "int8", "--calib", "calib.npz"], "openvino-int8", False),
    "tvm": (["--target", "tv", "--precision", "fp32"], "tvm-fp32", False),
}


def _missing(kind: str) -> str | None:
    from dlopt.targets import backend_status

    status = backend_status("tvm" if kind == "tvm" else "openvino")
    if status is not True:
        return str(status)
    if kind == "nncf":
        from dlopt.passes import quantize_nncf

        ready = quantize_nncf.available()
        return None if ready is True else str(ready)
    return None


def _staging(root, name):
    return next((p for p in root.iterdir() if p.name.startswith(f".{name}.dlopt-tmp-")), None)


def _one_try(root, kind: str, delay: float) -> dict:
    args, build_dir, inside = KINDS[kind]
    name = f"out-{kind}"
    proc = subprocess.Popen([DLOPT, "compile", "m.onnx", "-o", name, "--targets-file", "t.toml", "--no-cache",
                             "--runs", "1000000", *args], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while (staged := _staging(root, name)) is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the compile never started staging"
            time.sleep(0.02)
        time.sleep(delay)
        folder = (staged / "candidates" / build_dir).exists()
        building = folder if inside else not folder
        assert proc.poll() is None, ("the compile ended before the signal", proc.communicate())
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        return {"code": proc.returncode, "seconds": time.monotonic() - sent, "err": err, "building": building}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigterm_during_a_native_build_always_ends_the_compile(tmp_path, kind):
    missing = _missing(kind)
    if missing:
        pytest.skip(f"{kind} is not installed here: {missing}")
    models.save(models.conv_bn_relu(channels=8, size=16), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    (tmp_path / "t.toml").write_text(TARGETS)
    low, high = WINDOWS[kind]
    results = []
    for i in range(TRIES):
        delay = low + (high - low) * i / max(TRIES - 1, 1)
        result = _one_try(tmp_path, kind, delay)
        results.append(result)
        where = f"try {i + 1} ({delay:.2f} s after staging)"
        assert result["code"] == 130, (where, result)
        assert result["err"].strip().splitlines()[-1] == "dlopt: interrupted; nothing was written", (where, result)
        assert "Traceback" not in result["err"], (where, result)
        assert result["seconds"] < EXIT_WITHIN_S, (where, result)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx", "t.toml"], where
    # most signals landed inside the build itself, not before or after it
    assert sum(r["building"] for r in results) >= TRIES // 2, [(r["building"], round(r["seconds"], 2)) for r in results]
    print(f"{kind}: {TRIES} tries, {sum(r['building'] for r in results)} inside the build; exit within "
          f"{max(r['seconds'] for r in results):.2f} s at most")
