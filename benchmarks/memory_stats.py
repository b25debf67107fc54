"""Resident memory of this process for the benchmarks (Linux ``/proc``, with ``ru_maxrss`` as the fallback)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float:
    now = _status_mib("VmRSS")
    return now if now is not None else peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set of this process: VmHWM, which starts afresh at exec. ``ru_maxrss`` (the fallback) keeps
    the parent's peak across fork and exec, so a worker started by a big process would report the parent's."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
