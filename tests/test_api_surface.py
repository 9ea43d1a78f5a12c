"""What ``import dlopt`` shows a user: dir() and help() list the API, and ``dlopt.compile`` says
what it is doing the way ``dlopt compile`` does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from test_lazy_imports import HEAVY

TESTS = Path(__file__).parent
# TerminalProgress's line where stderr is not a terminal (the CLI's CI log)
LINE = re.compile(r"dlopt: (?P<stage>.+?): (done|running|\d+/\d+)( \(\d+ steps\))? \[\d+\.\d s\]")


def test_dir_and_help_list_the_api_without_importing_heavy_modules():
    probe = f"""
import json, pydoc, sys
import dlopt
names = dir(dlopt)
heavy = [m for m in {HEAVY!r} if m in sys.modules]
doc = pydoc.render_doc(dlopt, renderer=pydoc.plaintext)
print(json.dumps({{"names": names, "heavy": heavy, "all": dlopt.__all__, "doc": doc}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                    check=True).stdout)
    assert {"compile", "load", "export", "compress", "prune", "distill", "load_module", "CompileConfig", "Report",
            "errors", "__version__"} <= set(out["names"])
    assert set(out["all"]) <= set(out["names"])
    assert "_LAZY" not in out["names"] and "annotations" not in out["names"]
    assert out["heavy"] == []
    # help(dlopt) documents the functions themselves, progress= included
    assert "compile(model" in out["doc"] and "compress(model" in out["doc"] and "progress" in out["doc"]


# A data source that reads slowly (a disk, a share): calibration of 10 batches takes >= 9 x 0.3 s after its
# first batch, over TerminalProgress's 2 s, so the CLI would log a line for it.
SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import numpy as np
import models
import dlopt

class SlowFeeds:
    def __iter__(self):
        rng = np.random.default_rng(0)
        for _ in range(10):
            time.sleep(0.3)
            yield {{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}}

dlopt.compile(models.conv_bn_relu(), target="here", targets_file={targets!r}, out={out!r},
              precision="int8", calib=SlowFeeds(), samples=4, runs=5, cache=False, max_accuracy_drop=100, **{extra})
"""


def test_api_logs_stage_lines_like_the_cli_when_stderr_is_piped_and_nothing_with_progress_off(tmp_path):
    targets = tmp_path / "targets.toml"
    targets.write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\nprecisions = ["int8"]\n')
    runs = {}
    for name, extra in (("default", {}), ("off", {"progress": False})):
        script = SCRIPT.format(tests=str(TESTS), targets=str(targets), out=str(tmp_path / name), extra=extra)
        runs[name] = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
    results = {name: (p.communicate(timeout=600), p.returncode) for name, p in runs.items()}
    for name, ((stdout, stderr), rc) in results.items():
        assert rc == 0, f"{name}: {stderr}"

    lines = [line for line in results["default"][0][1].splitlines() if line.startswith("dlopt:")]
    assert lines, results["default"][0][1]
    assert all(LINE.fullmatch(line) for line in lines), lines
    assert "calibration" in {LINE.fullmatch(line)["stage"] for line in lines}
    seconds = [float(re.search(r"\[([\d.]+) s\]", line)[1]) for line in lines if ": calibration:" in line]
    assert seconds and max(seconds) >= 2.7
    # progress=False silences the stage lines (warnings, if any, still reach stderr through logging)
    off = results["off"][0][1]
    assert not [line for line in off.splitlines() if line.startswith("dlopt:") or LINE.search(line)], off


def test_the_standard_logging_silences_progress_too():
    import io
    import logging

    from dlopt.core.progress import TerminalProgress

    def lines(**logger_levels) -> list[str]:
        stream = io.StringIO()  # not a terminal: log lines, as in CI
        progress = TerminalProgress(stream=stream, quiet_s=0.0)
        saved = {name: logging.getLogger(name).level for name in logger_levels}
        try:
            for name, level in logger_levels.items():
                logging.getLogger(name).setLevel(level)
            progress("build ort/fp32", 0, 1)
            progress("build ort/fp32", 1, 1)
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
        return [LINE.fullmatch(line)["stage"] for line in stream.getvalue().splitlines()]

    assert lines() == ["build ort/fp32"]
    assert lines(dlopt=logging.WARNING) == []
    assert lines(**{"dlopt.core.progress": logging.ERROR}) == []
    # the nearest level set decides; the root logger's WARNING default does not silence
    assert lines(dlopt=logging.WARNING, **{"dlopt.core.progress": logging.INFO}) == ["build ort/fp32"]
    assert lines(root=logging.ERROR) == ["build ort/fp32"]
