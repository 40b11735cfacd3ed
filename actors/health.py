"""Whether a replica's engine still answers: its loop alive, and making steps while it has work.

Serve's default health check only proves the replica's process answers a call; a replica whose
generation loop died, or hangs in one step, would pass it while failing every request. The
continuous engine's counters move at every step (`steps`), so a watch that samples
them knows when the loop last made progress without touching the loop itself. "Has work" is the
replica's own count of requests handed to the engine and not yet answered: the engine's
snapshot of its queue is taken between steps, so a loop stuck in a step would still show the
queue it had before. Plain Python with no Ray: unit-tested with hand-made counters and clocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("ray.serve")

# The counters that change whenever the loop completes a step or a request.
PROGRESS_KEYS = ("steps", "finished", "failed", "cancelled")


def progress_mark(stats: dict[str, float]) -> tuple[float, ...]:
    """The part of the engine's counters that moves when its loop makes progress."""
    return tuple(stats.get(k, 0) for k in PROGRESS_KEYS)


@dataclass
class EngineWatch:
    """Samples the engine at each health check and each request; says why it is unhealthy, if it is.

    `stall_s`: how long the loop may go without progress while requests wait on it. The first
    verdict that turns bad is logged once; the 503s that follow say nothing more.
    """

    stall_s: float
    clock: Callable[[], float] = time.monotonic
    _mark: tuple[float, ...] | None = None
    _since: float = field(default=0.0)
    _reported: str | None = None

    def verdict(self, alive: bool, stats: dict[str, float], in_flight: int) -> str | None:
        """None when the engine answers; else the reason, in words an operator can act on."""
        now = self.clock()
        mark = progress_mark(stats)
        if mark != self._mark or in_flight == 0:
            self._mark, self._since = mark, now
        if not alive:
            reason = "the engine's generation loop has stopped"
        elif now - self._since > self.stall_s:
            reason = (f"the engine's generation loop has made no progress for {now - self._since:.0f} s "
                      f"with {in_flight} request(s) in flight (limit {self.stall_s:g} s)")
        else:
            reason = None
        if reason is not None and self._reported is None:
            log.error("replica unhealthy: %s; Serve will replace it, and its requests get 503 engine_restarting "
                      "meanwhile", reason)
        self._reported = reason
        return reason
