"""How long dlopt takes to give up on a TVM RPC tracker or RPC server that misbehaves on purpose, and what it says.

Servers on loopback (tests/rpc_servers.py) that accept a connection and then:

- ``drip-feed``: answer one byte every half second (each read gets something: only an overall
  deadline ends it);
- ``never-answer``: read what dlopt sends and never answer;
- ``garbage``: answer bytes of another protocol;
- ``huge-frame``: announce a 2 GiB frame (a tracker's JSON frame, a server's RPC packet), then
  send zeros as fast as they are read;
- ``not-a-dict`` (tracker only): a summary that is a list;
- ``silent-after-magic`` (tracker only): answer the protocol's magic, then nothing.

Surfaces: ``rpc-tracker`` (the tracker at --rpc-tracker misbehaves) and ``rpc-server`` (a working
tracker hands out a misbehaving server).  For each, the installed ``dlopt bench OUT --candidate
tvm/fp32 --rpc-tracker ... --rpc-key hostile`` runs in a child process with an outer timeout, on a
TVM compile of a tiny CNN made first in a temporary folder.  ``measure()`` returns one dict per case
(surface, server, seconds, exit, lines, message), the columns of bench/hostile_servers.py, which
imports it; run as a script it prints the table.  Asserts nothing.

    python bench/hostile_rpc.py [--outer-timeout 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the servers and tiny models

SURFACES = {"rpc-tracker": "tracker", "rpc-server": "server"}
TVM_HERE = '[targets.tvm-here]\nbase = "cpu"\nbackends = ["tvm"]\nprecisions = ["fp32"]\n'


def _dlopt() -> str:
    return str(Path(sys.executable).parent / "dlopt")


def _compile(folder: Path) -> Path:
    """A dlopt output holding one TVM candidate for this machine, made in ``folder``."""
    import models

    models.save(models.conv_bn_relu(channels=4, size=8), folder / "m.onnx")
    (folder / "dlopt.toml").write_text(TVM_HERE)
    done = subprocess.run([_dlopt(), "compile", "m.onnx", "--target", "tvm-here", "-o", "out", "--runs", "5",
                           "--no-tuning", "-q"], cwd=folder, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the TVM compile to bench failed: {done.stderr.strip()}")
    return folder / "out"


def run_against(out: Path, surface: str, behaviour: str, *, outer_timeout: float) -> dict:
    """One row: ``dlopt bench OUT --rpc-tracker`` against a ``behaviour`` tracker or server."""
    from rpc_servers import hostile

    with hostile(SURFACES[surface], behaviour) as tracker:
        start = time.monotonic()
        try:
            done = subprocess.run([_dlopt(), "bench", str(out), "--candidate", "tvm/fp32", "--runs", "5", "--json",
                                   "--rpc-tracker", tracker, "--rpc-key", "hostile"],
                                  capture_output=True, text=True, timeout=outer_timeout)
            rc, lines = done.returncode, done.stderr.strip().splitlines()
            message = lines[-1] if lines else ""
            try:  # a session that failed is the candidate's row; its reason says why
                (row,) = json.loads(done.stdout)["candidates"]
                message = row.get("reason") or message
            except (ValueError, KeyError, TypeError):
                pass
        except subprocess.TimeoutExpired:
            rc, lines = None, []
            message = f"still running after the outer timeout of {outer_timeout:g} s: killed"
        seconds = time.monotonic() - start
    return {"surface": surface, "server": behaviour, "seconds": round(seconds, 1), "exit": rc,
            "lines": len(lines), "message": message[:300]}


def measure(*, outer_timeout: float = 300.0, log=None) -> list[dict]:
    """Every surface x behaviour, on a TVM output compiled first in a temporary folder."""
    from rpc_servers import HOSTILE, TRACKER_ONLY

    rows = []
    with tempfile.TemporaryDirectory(prefix="dlopt-hostile-rpc-") as tmp:
        out = _compile(Path(tmp))
        for surface in SURFACES:
            for behaviour in HOSTILE + (TRACKER_ONLY if surface == "rpc-tracker" else ()):
                rows.append(run_against(out, surface, behaviour, outer_timeout=outer_timeout))
                if log:
                    log(f"{surface:12} {behaviour:13} {rows[-1]['seconds']:6.1f} s  exit {rows[-1]['exit']}")
    return rows


def main(argv=None) -> None:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-timeout", type=float, default=300.0, help="kill dlopt after this many seconds")
    args = parser.parse_args(argv)
    rows = measure(outer_timeout=args.outer_timeout, log=lambda line: print(line, file=sys.stderr))
    print(tabulate(rows, headers="keys", maxcolwidths=[None] * 5 + [90]))


if __name__ == "__main__":
    main()
