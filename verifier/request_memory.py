"""A request's own peak memory: the RSS high-water mark around each step of it.

`ru_maxrss` is the process's lifetime peak (model loading included, never reset). Linux lets a
process reset its high-water mark (`echo 5 > /proc/self/clear_refs`, then read `VmHWM` in
/proc/self/status), so a step's peak is measured exactly; a request's peak is the largest over
its steps (other sessions' steps between them do not count). Where /proc is not writable the
lifetime peak is reported and `exact` is False.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class RequestMemory:
    """Start before a request, wrap each of its steps in `step_begin`/`step_end`."""

    before_mb: float = 0.0  # resident memory when the request arrived
    peak_mb: float = 0.0  # highest resident memory during the request's steps
    exact: bool = True

    @classmethod
    def start(cls) -> "RequestMemory":
        now = _status_mb("VmRSS") or 0.0
        return cls(now, now)

    def step_begin(self) -> None:
        self.exact = _reset_high_water() and self.exact

    def step_end(self) -> None:
        peak = _status_mb("VmHWM") if self.exact else None
        if peak is None:
            peak, self.exact = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, False
        self.peak_mb = max(self.peak_mb, peak)

    def report(self) -> dict:
        return {"peak_rss_mb": round(self.peak_mb, 1), "request_rss_mb": round(self.peak_mb - self.before_mb, 1),
                "peak_rss_exact": self.exact}
