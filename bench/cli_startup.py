"""How long `dlopt --help` takes, and which heavy modules the CLI loads at start.

Prints figures; asserts nothing (timing belongs here, not in the tests).
    python bench/cli_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ["torch", "tvm", "openvino", "tensorrt", "onnxruntime", "onnx", "onnxscript", "onnxsim", "numpy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    exe = str(Path(sys.executable).parent / "dlopt")
    subprocess.run([exe, "--help"], capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run([exe, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    probe = "import sys, dlopt.cli.app; print(','.join(m for m in %r if m in sys.modules))" % HEAVY
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    print(f"dlopt --help over {args.runs} runs: median {statistics.median(times) * 1e3:.0f} ms, "
          f"max {max(times) * 1e3:.0f} ms (goal: < 500 ms)")
    print(f"heavy modules imported by `import dlopt.cli.app`: {loaded or 'none'}")


if __name__ == "__main__":
    main()
