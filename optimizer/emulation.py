"""Run a Python script on an emulated aarch64 with the TVM runtime and numpy.

So a library built here for an aarch64 board (the ``rpi5`` profile's TVM build) can be
loaded, run and checked on an x86_64 machine.  ``make arm64-env`` builds the
environment into ``<venv>/arm64``; ``DLOPT_ARM64_ENV`` names another folder of the
same layout:

    sysroot/  Debian's arm64 Python 3.11 and the C libraries it loads (QEMU_LD_PREFIX)
    site/     PyPI's aarch64 wheels of apache-tvm (runtime library only), apache-tvm-ffi
              and numpy (PYTHONPATH)

qemu-user translates the aarch64 code, so a run shows that the library loads and what
it computes, never how fast a board runs it.  Stdlib only: importing this costs nothing.

    python -m dlopt.emulation [ROOT]   # probe the environment: prints what runs, exits 1 if nothing
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dlopt.errors import TargetUnavailable

ARM64_ENV_VAR = "DLOPT_ARM64_ENV"
LABEL = "qemu-aarch64 emulation"
QEMU = "qemu-aarch64"
PYTHON = Path("usr/bin/python3.11")  # inside sysroot/
SITE_PACKAGES = ("tvm", "tvm_ffi", "numpy")
_HOW = f"run `make arm64-env`, or set {ARM64_ENV_VAR} to a folder holding sysroot/ and site/"

# Prints one line, so the Makefile can check a fresh environment before publishing it.
_PROBE = """\
import platform, time
started = time.perf_counter()
import numpy, tvm
from tvm.runtime.vm import VirtualMachine
seconds = time.perf_counter() - started
print(f"{platform.machine()}: Python {platform.python_version()}, numpy {numpy.__version__}, "
      f"TVM {tvm.__version__} runtime; import numpy, tvm took {seconds:.2f} s")
"""


def arm64_env_root() -> Path:
    """The environment's folder: ``$DLOPT_ARM64_ENV``, else ``arm64/`` in this Python's prefix (the venv)."""
    configured = os.environ.get(ARM64_ENV_VAR)
    return Path(configured) if configured else Path(sys.prefix) / "arm64"


@dataclass(frozen=True)
class EmulatedPython:
    """How to start the emulated Python: ``command`` + a script, with ``env`` over the caller's environment."""

    command: list[str]
    env: dict[str, str]
    label: str = LABEL


def aarch64_python(root: Path | str | None = None) -> EmulatedPython | str:
    """The emulated Python of ``root`` (default: ``arm64_env_root()``), or one line saying what is missing."""
    root = Path(root if root is not None else arm64_env_root()).absolute()  # the run may use another cwd
    qemu = shutil.which(QEMU)
    sysroot, site = root / "sysroot", root / "site"
    python = sysroot / PYTHON
    missing = []
    if qemu is None:
        missing.append(f"{QEMU} (apt-get install qemu-user)")
    if not python.is_file():
        missing.append(f"the arm64 Python {python}")
    lacking = [package for package in SITE_PACKAGES if not (site / package).is_dir()]
    if lacking:
        missing.append(f"{', '.join(lacking)} in {site}")
    if missing:
        return f"no aarch64 emulation: missing {'; '.join(missing)}; {_HOW}"
    env = {
        "QEMU_LD_PREFIX": str(sysroot),  # qemu looks up the loader and every path there first
        "PYTHONPATH": str(site),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the environment may be shared or read-only
        "TVM_USE_RUNTIME_LIB": "1",  # the environment ships libtvm_runtime.so, not the compiler
    }
    return EmulatedPython(command=[qemu, str(python)], env=env)


@lru_cache(maxsize=1)
def qemu_cpu_models() -> frozenset[str]:
    """The CPU models this qemu-aarch64 emulates (``cortex-a76``, ``max``, ...); empty without qemu."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        return frozenset()
    listing = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=30).stdout
    return frozenset(listing.split()[2:])  # after "Available CPUs:"


def run_emulated(script: Path, args: list[str], *, cwd: Path | str, timeout: float, threads: int | None = None,
                 cpu: str | None = None, root: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``args`` under the emulated Python; its output is captured as text.

    ``threads`` sets TVM_NUM_THREADS; ``cpu`` the emulated CPU model (qemu's default,
    ``max``, has every extension, so only a named model shows the code avoids what
    that CPU lacks).  A non-zero exit is the caller's to judge.  Raises
    TargetUnavailable when the environment is missing or the run outlasts ``timeout``.
    """
    python = aarch64_python(root)
    if isinstance(python, str):
        raise TargetUnavailable(python)
    if cpu is not None and cpu not in qemu_cpu_models():
        raise TargetUnavailable(f"{QEMU} cannot emulate a {cpu}; it knows {', '.join(sorted(qemu_cpu_models()))}")
    # The caller's Python settings (a venv's PYTHONHOME, PYTHONPATH) are for another interpreter.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")} | python.env
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(threads)
    if cpu is not None:
        env["QEMU_CPU"] = cpu
    try:
        return subprocess.run([*python.command, str(script), *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        raise TargetUnavailable(f"{Path(script).name} did not finish within {timeout:g} s under {LABEL} "
                                f"(emulated code runs about 100x slower than native); allow more time") from exc


def _probe(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else None
    with tempfile.TemporaryDirectory(prefix="dlopt-arm64-probe-") as folder:
        script = Path(folder) / "probe.py"
        script.write_text(_PROBE)
        started = time.perf_counter()
        try:
            done = run_emulated(script, [], cwd=folder, timeout=300, root=root)
        except TargetUnavailable as exc:
            print(exc, file=sys.stderr)
            return 1
    if done.returncode != 0:
        print(done.stderr.strip()[-2000:], file=sys.stderr)
        print(f"the emulated Python failed (exit {done.returncode})", file=sys.stderr)
        return 1
    print(f"{done.stdout.strip()} ({time.perf_counter() - started:.1f} s in all under {LABEL})")
    return 0


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1:]))
