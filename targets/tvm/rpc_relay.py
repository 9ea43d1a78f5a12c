"""The relay between TVM's native RPC client and a server: deadlines and a size cap, in a child process.

``dlopt.targets.tvm.rpc`` starts this file as a script (``python -P rpc_relay.py FD HOST PORT ...``) for each
session with a remote server.  It imports the standard library only: the relay's handshake deadline counts
from when the parent asked, so its own start must be short (run through rpc.py it imported numpy, onnx and
dlopt, 1.3 CPU-s and ten seconds of wall on a loaded 2-core machine, and missed the deadline it was keeping).
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import threading
import time

TALK_TIMEOUT_S = 10.0  # one exchange with the tracker, or a server's handshake, from start to end
REPLY_TIMEOUT_S = 600.0  # a call on the device (a timing run included) must answer within this
PACKET_CAP = 1 << 30  # a server's RPC packet (model outputs, the largest thing a session fetches)
PACKET_MIN_RATE = 256 << 10  # bytes per second: a packet begun must go on arriving
RPC_CODE_SUCCESS, RPC_CODE_MISMATCH = 0xFF271, 0xFF273  # tvm.rpc.base


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type when there is none), at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _left(deadline: float) -> float:
    """Seconds left until ``deadline``; TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _why(exc: OSError, seconds: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"nothing complete within {seconds:g} s"
    return exc.strerror or _one_line(exc)


class _Relay:
    """A loopback relay between TVM's native RPC client and a server, enforcing what the native
    client does not: deadlines and a size cap.

    TVM's ``rpc.connect`` has no timeout and sizes its buffers from what the server says; it
    connects to this relay instead, which forwards both ways and, when the server misses a
    deadline or announces an oversized packet, closes both sockets, so the native call fails at
    once instead of hanging.  Deadlines (monotonic): the handshake by ``handshake_by``, the
    session's first answer by ``answer_by``, later answers within ``reply_s`` of a request (a
    timing run on a slow board is one request), a packet once begun at PACKET_MIN_RATE.

    It runs in a child process (``_relay_process``): TVM frees remote objects with a blocking
    call made while holding the GIL, which would deadlock a relay thread in this process.
    """

    def __init__(self, listen: socket.socket, *, handshake_by: float, answer_by: float,
                 reply_s: float = REPLY_TIMEOUT_S, handshake_s: float | None = None) -> None:
        self.error: str | None = None
        self._client = self._upstream = None
        self._closed = threading.Event()
        self._listen, self._handshake_by, self._answer_by, self._reply_s = listen, handshake_by, answer_by, reply_s
        self._connect_s = max(0.0, answer_by - time.monotonic())
        # worded as the allowance the caller gave, not what was left of it when this process started
        allowed = handshake_s if handshake_s is not None else max(0.0, handshake_by - time.monotonic())
        self._waiting = f"no handshake within {allowed:.0f} s"
        self._asked: float | None = None  # when the client's oldest unanswered bytes went out

    def serve(self, host: str, port: int) -> None:
        try:
            self._listen.settimeout(_left(self._handshake_by))
            self._client, _ = self._listen.accept()
            self._upstream = socket.create_connection((host, port), timeout=_left(self._handshake_by))
            for sock in (self._client, self._upstream):
                sock.settimeout(None)  # deadlines are kept with select(), in both threads
                # an RPC session is many small request/answer packets: Nagle's algorithm would hold each
                # header back for the peer's delayed ACK (tens of ms a call), as TVM's own sockets do not
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            return self._fail(f"cannot reach it ({self._waiting if isinstance(exc, TimeoutError) else _why(exc, 0)})")
        finally:
            self._listen.close()
        threading.Thread(target=self._pump_up, name="dlopt-rpc-relay-up", daemon=True).start()
        try:
            self._from_server()
        except TimeoutError:
            self._fail(f"it stopped answering: {self._waiting}")
        except (OSError, ValueError) as exc:  # ValueError: select() on a socket closed meanwhile
            self._fail(f"the connection failed ({_why(exc, 0) if isinstance(exc, OSError) else 'closed'})")

    def _pump_up(self) -> None:
        """Client to server as it comes; the server must take each chunk within TALK_TIMEOUT_S."""
        try:
            while data := self._client.recv(1 << 16):
                if self._asked is None:
                    self._asked = time.monotonic()
                _send_by(self._upstream, data, time.monotonic() + TALK_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            self._fail(f"it stopped reading what dlopt sent ({_why(exc, TALK_TIMEOUT_S)})")
        self.close()

    def _from_server(self) -> None:
        """Server to client: the handshake (code, key), then packets (uint64 size, then the bytes)."""
        head = _recv_by(self._upstream, 4, lambda: self._handshake_by)
        code = int.from_bytes(head, "little", signed=True)
        if code != RPC_CODE_SUCCESS:
            return self._fail("it refused the key the tracker gave (another client took that server?)"
                              if code == RPC_CODE_MISMATCH else "it is not a TVM RPC server (a wrong handshake)")
        size = _recv_by(self._upstream, 4, lambda: self._handshake_by)
        length = int.from_bytes(size, "little", signed=True)
        if not 0 <= length <= 4096:
            return self._fail(f"it is not a TVM RPC server (its handshake names a key of {length} bytes)")
        self._client.sendall(head + size + _recv_by(self._upstream, length, lambda: self._handshake_by))
        first = True
        self._waiting = f"no answer to the session's start within {self._connect_s:.0f} s"
        while True:
            try:
                header = _recv_by(self._upstream, 8, lambda: self._answer_by if first else self._reply_by())
            except ConnectionError:
                return self.close()  # the session ended
            self._asked, first, size = None, False, int.from_bytes(header, "little")
            if size > PACKET_CAP:
                return self._fail(f"it announced a packet of {size} bytes (dlopt accepts at most {PACKET_CAP})")
            seconds = TALK_TIMEOUT_S + size / PACKET_MIN_RATE
            by, self._waiting = time.monotonic() + seconds, f"a packet of {size} bytes took over {seconds:.0f} s"
            self._client.sendall(header)
            while size:
                chunk = _recv_by(self._upstream, min(size, 1 << 20), lambda: by, partial=True)
                self._client.sendall(chunk)
                size -= len(chunk)
            self._waiting = f"no answer within {self._reply_s:g} s of a request"

    def _reply_by(self) -> float | None:
        asked = self._asked
        return None if asked is None else asked + self._reply_s

    def _fail(self, why: str) -> None:
        if self.error is None and not self._closed.is_set():
            self.error = why
        self.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self._listen, self._client, self._upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _recv_by(sock: socket.socket, size: int, deadline, *, partial: bool = False) -> bytes:
    """``size`` bytes (with ``partial``, what came first) from a blocking ``sock`` by ``deadline()``
    (monotonic, asked again each second; None: none yet)."""
    parts, got = [], 0
    while got < size:
        by = deadline()
        wait = 1.0 if by is None else min(1.0, _left(by))
        if not select.select([sock], [], [], wait)[0]:
            continue
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection was closed")
        if partial:
            return chunk
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _send_by(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        if select.select([], [sock], [], _left(deadline))[1]:
            with contextlib.suppress(BlockingIOError):
                view = view[sock.send(view, socket.MSG_DONTWAIT):]


def main(argv: list[str]) -> None:
    """The child: relay one session, then print why it cut the connection (an empty line if it did not)."""
    fd, host, port, handshake_by, answer_by, reply_s, handshake_s = argv
    relay = _Relay(socket.socket(fileno=int(fd)), handshake_by=float(handshake_by), answer_by=float(answer_by),
                   reply_s=float(reply_s), handshake_s=float(handshake_s))
    relay.serve(host, int(port))
    print(relay.error or "", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
