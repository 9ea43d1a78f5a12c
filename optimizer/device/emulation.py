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

    python -m dlopt.device.emulation [ROOT]   # probe the environment: prints what runs, exits 1 if nothing
    python -m dlopt.device.emulation serve --tracker HOST:PORT --key rpi5 [--cpu cortex-a76]
                                       # an emulated board: a TVM RPC server registered with a tracker
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dlopt.core.errors import ConfigError, DloptError, TargetUnavailable, one_line
from dlopt.core.remote import RemoteDevice
from dlopt.targets.tvm.rpc import servers

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


# -- an emulated board: a TVM RPC server under qemu-aarch64 ------------------------------------------

# Runs under the emulated aarch64 Python: TVM's RPC server loop (PopenRPCServerState) in this process,
# because tvm.exec.rpc_server starts its worker by executing sys.executable, which qemu-user cannot do
# without binfmt_misc ("Exec format error"), and its popen worker needs cloudpickle.  It prints the port
# it bound, and ends its process group (its sessions too) when the process that started it goes.
SERVER_LAUNCHER = """\
import os, signal, sys, threading, time
from tvm.rpc import server
host, port, tracker, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tracker_host, tracker_port = tracker.rsplit(":", 1)
parent = os.getppid()
def orphaned():
    while os.getppid() == parent:
        time.sleep(1)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=orphaned, daemon=True).start()
state = server.PopenRPCServerState(host, port, port + 100, tracker_addr=(tracker_host.strip("[]"), int(tracker_port)),
                                   key=key)
print(state.port, flush=True)
state.thread.join()
"""
SERVE_START_S = 180.0  # importing TVM under qemu takes seconds; registering, a few more
TRACKER_WAIT_S = 20.0  # a tracker started just before (a script, make) takes seconds to listen


def serve(tracker: str, key: str, *, host: str = "127.0.0.1", port: int = 9090, cpu: str | None = None,
          root: Path | str | None = None, log=print, timeout: float = SERVE_START_S) -> int:
    """An emulated aarch64 board: TVM's RPC server under qemu-aarch64, registered with the RPC tracker
    at ``tracker`` under ``key``, until SIGINT or SIGTERM.  Says one ready line through ``log``.

    Raises ConfigError (a bad address or key, an unknown CPU) or TargetUnavailable (no emulation
    environment, no tracker, a server that did not start); returns the exit code (0: stopped).
    """
    device = RemoteDevice.parse(tracker, key)
    python = aarch64_python(root)
    if isinstance(python, str):
        raise TargetUnavailable(python)
    if cpu is not None and cpu not in qemu_cpu_models():
        raise ConfigError(f"{QEMU} cannot emulate a {cpu}; it knows {', '.join(sorted(qemu_cpu_models()))}")
    before = _registered(device, wait_s=TRACKER_WAIT_S)  # the tracker answers before anything starts
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | python.env
    if cpu is not None:
        env["QEMU_CPU"] = cpu
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory(prefix="dlopt-board-") as folder:
        launcher, server_log = Path(folder) / "rpc_server.py", Path(folder) / "server.log"
        launcher.write_text(SERVER_LAUNCHER)
        env["TMPDIR"] = folder  # the server's session folders
        with open(server_log, "wb") as errors:
            proc = subprocess.Popen([*python.command, str(launcher), host, str(port), device.tracker, key],
                                    stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, env=env,
                                    cwd=folder, start_new_session=True)  # Ctrl-C reaches dlopt, which ends it
        try:
            bound = _wait_registered(proc, device, before, timeout, stop, server_log)
            if bound is None:
                return 0
            where = f"{cpu}" if cpu else "qemu's max CPU"
            log(f"dlopt: emulated aarch64 board ready: key {key!r} with the RPC tracker at {device.tracker}, "
                f"server on {host}:{bound} under {LABEL} ({where}); Ctrl-C stops it")
            while not stop and proc.poll() is None:
                time.sleep(0.2)
            if not stop:
                raise TargetUnavailable(f"the emulated RPC server exited with {proc.returncode}: "
                                        f"{_last_line(server_log)}")
            return 0
        finally:
            _stop_group(proc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _registered(device, *, wait_s: float = 0.0) -> int:
    """Servers the tracker lists under the device's key; a tracker not listening yet is asked again
    for up to ``wait_s`` seconds, then its TargetUnavailable (one line) goes up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return servers(device, timeout=10).get(device.key, (0, 0))[0]
        except TargetUnavailable as exc:
            if time.monotonic() > deadline or "Connection refused" not in str(exc):
                raise
            time.sleep(0.5)


def _wait_registered(proc: subprocess.Popen, device, before: int, timeout: float, stop: list,
                     server_log: Path) -> int | None:
    """The port the server bound, once the tracker lists one more server under the key; None when
    stopped first; TargetUnavailable when the server exits or outlasts ``timeout``."""
    deadline, line, bound = time.monotonic() + timeout, b"", None
    while not stop:
        if proc.poll() is not None:
            raise TargetUnavailable(f"the emulated RPC server exited with {proc.returncode} before it registered: "
                                    f"{_last_line(server_log)}")
        if time.monotonic() > deadline:
            raise TargetUnavailable(f"the emulated RPC server did not register with the tracker at "
                                    f"{device.tracker} within {timeout:g} s: {_last_line(server_log)}")
        if bound is None:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                line += os.read(proc.stdout.fileno(), 256)
                *done, line = line.split(b"\n")
                bound = next((int(text) for text in done if text.strip().isdigit()), None)  # the launcher's port
            continue
        if _registered(device) > before:
            return bound
        time.sleep(0.2)
    return None


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its sessions too), SIGKILL after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.stdout is not None:
        proc.stdout.close()


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1][-300:] if lines else "(no output)"


def serve_main(argv: list[str]) -> int:
    """``python -m dlopt.device.emulation serve``: errors are one line on stderr, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m dlopt.device.emulation serve",
                                     description="An emulated aarch64 board: a TVM RPC server under qemu-aarch64 "
                                                 "(make arm64-env) registered with an RPC tracker under KEY.")
    parser.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the RPC tracker to register with")
    parser.add_argument("--key", required=True, help="the key clients ask the tracker for (e.g. rpi5)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on [127.0.0.1; an RPC server runs whatever it is sent]")
    parser.add_argument("--port", type=int, default=9090, help="first port to try (up to 100 more) [9090]")
    parser.add_argument("--cpu", default=None, help="qemu CPU model to emulate, e.g. cortex-a76 [qemu's max]")
    args = parser.parse_args(argv)
    try:
        return serve(args.tracker, args.key, host=args.host, port=args.port, cpu=args.cpu,
                     log=lambda line: print(line, flush=True))
    except DloptError as exc:
        print(f"dlopt: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C while waiting for the tracker, before any server started
        return 130


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
    if sys.argv[1:2] == ["serve"]:
        sys.exit(serve_main(sys.argv[2:]))
    sys.exit(_probe(sys.argv[1:]))
