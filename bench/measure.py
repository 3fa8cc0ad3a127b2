"""Wall-clock time and peak resident-memory increase of one call, in this process.

``measure(fn, *args, **kwargs) -> (result, seconds, peak_mb)``

The peak is the largest resident set size (RSS, read from ``/proc/self/statm``)
seen while ``fn`` runs, minus the RSS at the start (after ``gc.collect()`` and glibc's
``malloc_trim(0)``, so memory freed by earlier calls is not silently reused), in MiB
(2**20 bytes). A daemon thread samples RSS every ``interval`` seconds
(default 5 ms), and a last sample is taken right after the call, so allocations
that live shorter than the interval can be missed: the number is a lower bound
on the true peak, good to a few MB for the multi-second calls we bench. It sees
every library in the process alike (torch, numpy, dask, ...), which is the
point: the peers run in the same process as headwater.

Also usable as a context manager::

    with Measure() as m:
        work()
    m.seconds, m.peak_mb
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Measure", "measure", "rss_mb"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MB = 1024.0 * 1024.0


def _rss_bytes() -> int:
    """Current resident set size of this process in bytes (Linux /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the (monotone) ru_maxrss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc malloc_trim), so that memory freed by
    an earlier call does not hide this call's peak (RSS would not grow while the
    allocator reuses it). No-op where unavailable."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def rss_mb() -> float:
    """Current RSS in MiB."""
    return _rss_bytes() / _MB


class Measure:
    """Context manager: ``seconds`` and ``peak_mb`` are set on exit."""

    def __init__(self, interval: float = 0.005):
        self.interval = float(interval)
        self.seconds: float = float("nan")
        self.peak_mb: float = float("nan")
        self.baseline_mb: float = float("nan")
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            self._peak = max(self._peak, r)

    def __enter__(self) -> Measure:
        gc.collect()
        _trim_heap()
        self._baseline = _rss_bytes()
        self._peak = self._baseline
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.baseline_mb = self._baseline / _MB
        self.peak_mb = max(0, self._peak - self._baseline) / _MB
        return False


def measure(
    fn: Callable[..., Any], *args: Any, interval: float = 0.005, **kwargs: Any
) -> tuple[Any, float, float]:
    """Run ``fn(*args, **kwargs)``; return ``(result, seconds, peak_mb)``.

    ``peak_mb`` is the peak RSS increase over the RSS at the start, in MiB.
    Exceptions from ``fn`` propagate (the sampler thread is stopped first).
    """
    with Measure(interval) as m:
        result = fn(*args, **kwargs)
    return result, m.seconds, m.peak_mb


if __name__ == "__main__":  # tiny self-check
    import numpy as np

    def _alloc(mb: int) -> float:
        a = np.ones(int(mb * _MB // 8))
        time.sleep(0.05)
        return float(a.sum())

    _, s, p = measure(_alloc, 200)
    print(f"alloc 200 MB: {s:.3f} s, peak {p:.1f} MB")
