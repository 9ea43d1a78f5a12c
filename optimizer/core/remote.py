"""The address of a device farm: the TVM RPC tracker at ``host:port`` and the key its boards registered.

Parsed when the configuration is made (``--rpc-tracker``/``--rpc-key``), so a bad address is a
one-line error before any work; connecting is ``dlopt.targets.tvm.rpc``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dlopt.core.errors import ConfigError

_KEY = re.compile(r"[A-Za-z0-9._+-]+")  # the tracker splits keys on ':' and the handshake on spaces


@dataclass(frozen=True)
class RemoteDevice:
    """The devices registered under ``key`` with the RPC tracker at ``host:port``."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, tracker: str, key: str) -> "RemoteDevice":
        """From ``--rpc-tracker HOST:PORT`` (``[::1]:9190`` for IPv6) and ``--rpc-key KEY``."""
        text = tracker.strip()
        host, sep, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port:
            raise ConfigError(f"RPC tracker {tracker!r} is not HOST:PORT (e.g. 127.0.0.1:9190)")
        if ":" in host and not text.startswith("["):
            raise ConfigError(f"RPC tracker {tracker!r}: write an IPv6 address in brackets ([::1]:9190)")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"RPC tracker {tracker!r}: port {port!r} is not a number from 1 to 65535")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"RPC key {key!r} must be letters, digits, '.', '_', '+' or '-' (e.g. rpi5), "
                              f"as given to the device's rpc_server --key")
        return cls(host, int(port), key)

    @property
    def tracker(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.key} via RPC tracker {self.tracker}"
