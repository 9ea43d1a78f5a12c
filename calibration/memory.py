"""Peak resident memory of this process over a block of code."""

from __future__ import annotations

import threading


def current_rss() -> int | None:
    """Resident set size in bytes now; on systems without /proc, the lifetime peak instead; None if unknown."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


class PeakRSS:
    """``with PeakRSS() as rss: ...`` then ``rss.start_bytes``, ``rss.peak_bytes``, ``rss.delta_bytes``.

    A daemon thread samples the RSS every ``interval`` seconds (5 ms by default), so a
    spike shorter than that can be missed.  Without /proc the figures come from the
    lifetime peak (``getrusage``), so ``delta_bytes`` then only counts growth beyond
    any earlier peak.  ``delta_bytes`` (peak - start, never negative) is what the
    block added; all three are None where the platform reports nothing.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int | None:
        if self.start_bytes is None or self.peak_bytes is None:
            return None
        return max(0, self.peak_bytes - self.start_bytes)

    def _sample(self) -> None:
        rss = current_rss()
        if rss is not None and (self.peak_bytes is None or rss > self.peak_bytes):
            self.peak_bytes = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self.start_bytes = self.peak_bytes = current_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dlopt-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
