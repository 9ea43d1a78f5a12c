"""`dlopt bench` (issue 24 item 7): `--select` on a machine that is not the target's is refused before
anything runs, and bench says in one line that the original model is not there to time."""

from __future__ import annotations

import json
import shutil
import time

import pytest

import models
from cli import dlopt

# An aarch64 board with ONNX Runtime only: a real rpi5-kind output that needs no cross compiler.
PI_ORT = '[targets.pi-ort]\nbase = "rpi5"\nbackends = ["ort"]\nprecisions = ["fp32", "fp16"]\n'


@pytest.fixture(scope="module")
def pi_output(tmp_path_factory):
    import dlopt

    root = tmp_path_factory.mktemp("pi-ort")
    (root / "targets.toml").write_text(PI_ORT)
    dlopt.compile(models.save(models.conv_bn_relu(batch="N"), root / "cnn.onnx"), target="pi-ort",
                  targets_file=root / "targets.toml", out=root / "out", precision="auto", samples=4, runs=5, warmup=1)
    return root / "out"


def test_select_on_another_architecture_is_refused_before_anything_runs(pi_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pi_output, out)
    assert set(json.loads((out / "manifest.json").read_text())["bundle"])  # more than one candidate to time
    started = time.perf_counter()
    done = dlopt("bench", out, "--select", "--runs", "2000")
    seconds = time.perf_counter() - started
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "dlopt: error: --select: this machine (x86_64) is not the pi-ort device (aarch64); timings here do not "
        "choose for it: run `dlopt bench --select` there (nothing was run)"]
    assert not (out / "device_report.json").exists()  # written after timing: nothing was timed
    print(f"refused in {seconds:.1f} s")


def test_bench_on_a_cpu_output_says_the_original_is_not_there(ort_output, tmp_path):
    compiled, report = ort_output
    out = tmp_path / "out"
    shutil.copytree(compiled, out)
    done = dlopt("bench", out, "--runs", "20", "-q")
    assert done.returncode == 0, done.stderr
    p50 = report["baseline"]["latency"]["p50_ms"]
    line = (f"original: not in out/ (an output ships only the candidates the compile kept), so bench does not time "
            f"it; the compile timed it beside them at {p50:.3f} ms p50 (report.md)")
    assert done.stdout.strip().splitlines()[-1] == line
    assert json.loads((out / "device_report.json").read_text())["original"] == line
    print(done.stdout)


def test_fastest_compares_only_native_timings_and_says_so():
    """A bench through --rpc-tracker times the TVM library on the device and the rest here: the fastest is
    named among the native rows only, and the line says which ran elsewhere."""
    from dlopt.device.device_check import fastest

    def row(key, ran_as, p50):
        return {"key": key, "verified": True, "ran_as": ran_as,
                "latency": {"p50_ms": p50, "ci_low_ms": p50, "ci_high_ms": p50, "runs": 100}}

    rows = [row("ort/fp32", "native", 0.015), row("tvm/fp32", "rpc rpi5", 0.510)]
    key, why = fastest(rows)
    assert key == "ort/fp32"
    assert why == ("fastest verified: ort/fp32 at 0.015 ms (p50) among those timed natively here (not compared: "
                   "tvm/fp32, timed on another machine through RPC or emulation)")
    assert fastest(rows[:1])[1] == "fastest verified: ort/fp32 at 0.015 ms (p50)"
