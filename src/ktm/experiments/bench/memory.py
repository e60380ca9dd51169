"""Peak memory of one call: resident set size on the CPU (sampled), the allocator peak on CUDA."""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable

import torch


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS starts from live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident-set growth of this process while the ``with`` block runs.

    A thread samples /proc/self/statm every ``interval`` seconds; ``peak_bytes`` is the
    highest sample minus the RSS just before the block (after ``malloc_trim``). Sampling can
    miss spikes shorter than the interval, so this is a lower bound on the true peak.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_bytes: int | None = None

    def __enter__(self):
        _malloc_trim()
        self.base = _rss_bytes()
        self._max = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.base is not None:
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            r = _rss_bytes()
            if r is not None and r > self._max:
                self._max = r
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.base is None:
            return False
        self._thread.join()
        r = _rss_bytes()
        self.peak_bytes = max(self._max, r or 0) - self.base
        return False


def peak_memory(fn: Callable[[], object], device) -> tuple[int | None, object, str]:
    """``(peak bytes above the starting point, fn's result, what was measured)``."""
    device = torch.device(device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            out = fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - start, out, "cuda max_memory_allocated"
        with PeakRSS() as p:
            out = fn()
        return p.peak_bytes, out, "cpu RSS growth (sampled every 1 ms)"
