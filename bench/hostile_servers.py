"""How long dlopt takes to give up on servers that misbehave on purpose, and what it says.

HTTP servers on loopback that accept a connection and then:

- ``never``: read the request and never answer (the connection stays open);
- ``drip``: answer a status line, then one header byte a second, never ending the headers
  (every byte resets a client's per-read timeout, so only an overall deadline ends it);
- ``garbage``: answer bytes that are not HTTP and close.

For each, the installed ``dlopt package OUT`` runs against it as MLflow (``--mlflow URL``) and
as a Pushgateway (``--pushgateway URL``) in a child process with an outer timeout, on a compile
of a tiny model made first in a temporary folder.  When bench/hostile_rpc.py exists, its
``measure()`` rows (RPC tracker and server) join the same table.  Prints a table; asserts nothing.

    python bench/hostile_servers.py [--publish-timeout 20] [--outer-timeout 300]

``HostileServer`` is also what tests/test_publish_deadlines.py starts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KINDS = ("never", "drip", "garbage")
HOST = "127.0.0.1"
GARBAGE = b"\x00\x17SSH-2.0-not-http\r\n\xff\xfe\r\n\r\n"


class HostileServer:
    """A loopback TCP server that misbehaves as ``kind``; a context manager giving its ``url``.

    Every connection gets its own daemon thread; leaving the context closes the listening socket
    and every connection, so a client still waiting on it sees the connection end."""

    def __init__(self, kind: str, *, drip_interval: float = 1.0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.drip_interval = kind, drip_interval
        self.connections = 0
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.url = f"http://{HOST}:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, name=f"hostile-{kind}", daemon=True)

    def __enter__(self) -> "HostileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for conn in list(self._open):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        with contextlib.suppress(OSError):
            with contextlib.suppress(TimeoutError, socket.timeout):
                conn.recv(65536)  # the request (or its start); what it asks does not matter
            if self.kind == "garbage":
                conn.sendall(GARBAGE)
                conn.close()
                return
            if self.kind == "drip":
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            while not self._stop.wait(self.drip_interval):
                if self.kind == "drip":
                    conn.sendall(b"a")


def _compile(folder: Path) -> Path:
    """A finished dlopt output of a one-Relu model for ONNX Runtime (fp32), made in ``folder``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "tiny.onnx")
    (folder / "targets.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    done = subprocess.run([_dlopt(), "compile", "tiny.onnx", "--target", "here", "--targets-file", "targets.toml",
                           "--precision", "fp32", "--runs", "5", "--samples", "2", "-o", "out"],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the compile to publish failed: {done.stderr.strip()}")
    return folder / "out"


def _dlopt() -> str:
    return str(Path(sys.executable).parent / "dlopt")


def run_against(out: Path, surface: str, kind: str, *, publish_timeout: float, outer_timeout: float,
                cwd: Path) -> dict:
    """One row: ``dlopt package OUT --<surface> URL`` against a ``kind`` server."""
    with HostileServer(kind) as server:
        start = time.monotonic()
        try:
            done = subprocess.run([_dlopt(), "package", str(out), f"--{surface}", server.url,
                                   "--publish-timeout", f"{publish_timeout:g}"],
                                  cwd=cwd, capture_output=True, text=True, timeout=outer_timeout)
            rc, message = done.returncode, (done.stderr.strip() or done.stdout.strip()).splitlines()
        except subprocess.TimeoutExpired:
            rc, message = None, [f"still running after the outer timeout of {outer_timeout:g} s: killed"]
        seconds = time.monotonic() - start
    return {"surface": surface, "server": kind, "seconds": round(seconds, 1), "exit": rc,
            "lines": len(message), "message": (message[-1] if message else "")[:160]}


def rpc_rows() -> list[dict]:
    """bench/hostile_rpc.py's ``measure()`` rows, when that bench is there."""
    path = Path(__file__).with_name("hostile_rpc.py")
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location("dlopt_bench_hostile_rpc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = []
    for row in module.measure():
        row = dict(row) if isinstance(row, dict) else dict(zip(("surface", "server", "seconds", "exit", "message"),
                                                                row))
        rows.append(row)
    return rows


def main(argv=None) -> None:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publish-timeout", type=float, default=20.0,
                        help="dlopt's --publish-timeout for the MLflow and Pushgateway rows")
    parser.add_argument("--outer-timeout", type=float, default=300.0, help="kill dlopt after this many seconds")
    parser.add_argument("--surfaces", default="mlflow,pushgateway")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlopt-hostile-") as tmp:
        out = _compile(Path(tmp))
        for surface in args.surfaces.split(","):
            for kind in KINDS:
                rows.append(run_against(out, surface, kind, publish_timeout=args.publish_timeout,
                                        outer_timeout=args.outer_timeout, cwd=Path(tmp)))
                print(f"{surface:12} {kind:8} {rows[-1]['seconds']:6.1f} s  exit {rows[-1]['exit']}", file=sys.stderr)
    rows += rpc_rows()
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
