"""Process memory readings the benchmarks share (Linux ``/proc``): current and peak RSS, and a peak reset."""

from __future__ import annotations


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` field in MB (``VmRSS``: resident now, ``VmHWM``: peak resident)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
