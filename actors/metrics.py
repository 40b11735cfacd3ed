"""The engine's metrics for Prometheus, one series per Serve replica, through Ray's metrics export.

The engine keeps running totals and levels in its stats snapshot (`Engine.stats()`: a dict the
loop replaces after every step, so reading it takes no lock and never waits on a step). A small
thread in the replica reads it every `interval_s` and turns it into Ray metrics: counters take
the growth since the last read, gauges the current level. Per-request latencies (time to first
token, time per output token) come from each finished request's result instead, since totals
cannot make a histogram.

Every series is tagged with the replica's `deployment`, `replica` and `application`, the tags Ray
Serve puts on its own metrics, so the two can be joined. Ray prefixes each name with `ray_`, and
Prometheus adds `_total` to counters (see the README's table). Counters start at 0 when the replica
starts, so a rate can be taken from the first scrape and an absent series means an absent replica.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.util import metrics as ray_metrics

from pipeline.schemas import GenerationResult

log = logging.getLogger(__name__)

TAG_KEYS = ("deployment", "replica", "application")
TTFT_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

# Counter name -> (its help text, the stats keys its running total adds, those it subtracts).
COUNTERS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "llava_engine_prefill_tokens_computed": (
        "Prompt tokens run through the model in prefill.", ("prefill_tokens_computed",), ()),
    "llava_engine_prefill_tokens_matched": (
        "Prompt tokens taken from a stored prefix instead of being computed.", ("prefill_tokens_matched",), ()),
    "llava_engine_image_cache_hits": (
        "Images whose features were found in the engine's image cache.",
        ("image_encodings_requested",), ("image_encodings_run",)),
    "llava_engine_image_cache_misses": (
        "Images the vision tower encoded (not in the image cache).", ("image_encodings_run",), ()),
}
# Gauge name -> (its help text, the stats key it shows).
GAUGES: dict[str, tuple[str, str]] = {
    "llava_engine_requests_running": ("Requests holding a slot of the engine's loop.", "running"),
    "llava_engine_requests_waiting": ("Requests queued for a slot of the engine's loop.", "waiting"),
    "llava_engine_kv_cache_tokens_used": ("KV cache positions the running requests fill.", "kv_tokens_used"),
    "llava_engine_kv_cache_tokens_total": ("KV cache positions of all the loop's slots.", "kv_tokens_total"),
}
TTFT = "llava_engine_time_to_first_token_seconds"
TPOT = "llava_engine_time_per_output_token_seconds"
LOOP_RESTARTS = "llava_engine_loop_restarts"


class StatsSource(Protocol):
    """What the metrics read of an engine: its stats snapshot, nothing that takes its loop's time."""

    def stats(self) -> Mapping[str, float]: ...


def counter_totals(stats: Mapping[str, float]) -> dict[str, float]:
    """Each counter's running total in one stats snapshot; a counter whose keys the snapshot lacks
    (the static scheduler keeps no prefill or image counts) is left out rather than shown as 0."""
    totals = {}
    for name, (_, added, subtracted) in COUNTERS.items():
        if all(key in stats for key in added + subtracted):
            totals[name] = sum(stats[k] for k in added) - sum(stats[k] for k in subtracted)
    return totals


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """What each counter grew by between two reads of its totals. A total that went down belongs
    to a new engine loop that counts from zero again, so all of it is growth."""
    deltas = {}
    for name, total in after.items():
        previous = before.get(name, 0)
        grown = total - previous if total >= previous else total
        if grown > 0:
            deltas[name] = grown
    return deltas


def gauge_values(stats: Mapping[str, float]) -> dict[str, float]:
    """Each gauge's level in one stats snapshot (those the snapshot has)."""
    return {name: float(stats[key]) for name, (_, key) in GAUGES.items() if key in stats}


def latencies(result: GenerationResult) -> tuple[float | None, float | None]:
    """(time to first token, mean time per output token after it), in seconds, of a finished
    request. None where the engine did not time it: the static scheduler answers whole, and a
    one-token answer has no time between tokens."""
    if result.error is not None or result.first_token_ms <= 0:
        return None, None
    ttft = result.first_token_ms / 1000.0
    if result.num_output_tokens < 2:
        return ttft, None
    return ttft, max(0.0, result.generation_ms - result.first_token_ms) / 1000.0 / (result.num_output_tokens - 1)


@dataclass(frozen=True)
class Instruments:
    """The process's Ray metrics objects: one of each name per process, whatever the replicas."""

    counters: dict[str, ray_metrics.Counter]
    gauges: dict[str, ray_metrics.Gauge]
    ttft: ray_metrics.Histogram
    tpot: ray_metrics.Histogram
    restarts: ray_metrics.Counter


@functools.cache
def instruments() -> Instruments:
    """Made on first use, in the process that records them (Ray metrics are per worker)."""
    return Instruments(
        counters={name: ray_metrics.Counter(name, text, tag_keys=TAG_KEYS) for name, (text, _, _) in COUNTERS.items()},
        gauges={name: ray_metrics.Gauge(name, text, tag_keys=TAG_KEYS) for name, (text, _) in GAUGES.items()},
        ttft=ray_metrics.Histogram(TTFT, "Time from the engine taking a request to its first token.",
                                   boundaries=TTFT_BOUNDARIES_S, tag_keys=TAG_KEYS),
        tpot=ray_metrics.Histogram(TPOT, "A request's mean time per output token after its first.",
                                   boundaries=TPOT_BOUNDARIES_S, tag_keys=TAG_KEYS),
        restarts=ray_metrics.Counter(LOOP_RESTARTS, "Times the replica brought its engine's loop back.",
                                     tag_keys=TAG_KEYS),
    )


def replica_tags() -> dict[str, str]:
    """This replica's deployment, replica id and application; outside Serve (a script, a test)
    the process id stands for the replica."""
    try:
        context = serve.get_replica_context()
    except RayServeException:
        return {"deployment": "", "replica": f"pid-{os.getpid()}", "application": ""}
    return {"deployment": context.deployment, "replica": context.replica_tag, "application": context.app_name or ""}


def _start_at_zero(counter: ray_metrics.Counter, tags: dict[str, str]) -> None:
    """Show a counter at 0 before its first event. Ray's `inc` refuses 0, so the point is recorded
    directly; the exporter then serves it like any other."""
    counter._record(0, tags=tags)


def loop_restarted(tags: dict[str, str] | None = None) -> None:
    """Count one restart of the engine's loop. The replica's health code calls it when it brings a
    dead loop back; it needs no handle on the replica's `EngineMetrics`, only this name."""
    instruments().restarts.inc(1, tags=tags or replica_tags())


class EngineMetrics:
    """One replica's engine metrics: `request_done` per finished request, `update` (or the thread
    `start` runs) for the snapshot's counters and gauges."""

    def __init__(self, engine: StatsSource, tags: dict[str, str] | None = None, interval_s: float = 1.0):
        self.engine = engine
        self.tags = tags or replica_tags()
        self.interval_s = interval_s
        self.instruments = instruments()
        self._totals: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        kept = [self.instruments.counters[name] for name in counter_totals(engine.stats())]
        for counter in [*kept, self.instruments.restarts] if kept else []:  # the static scheduler has no loop
            _start_at_zero(counter, self.tags)
        self.update()

    def update(self) -> None:
        """Counters grow by what the engine did since the last update; gauges take its levels."""
        stats = self.engine.stats()
        totals = counter_totals(stats)
        for name, grown in counter_deltas(self._totals, totals).items():
            self.instruments.counters[name].inc(grown, tags=self.tags)
        self._totals = totals
        for name, value in gauge_values(stats).items():
            self.instruments.gauges[name].set(value, tags=self.tags)

    def request_done(self, result: GenerationResult) -> None:
        """Observe a finished request's time to first token and time per output token."""
        ttft, tpot = latencies(result)
        if ttft is not None:
            self.instruments.ttft.observe(ttft, tags=self.tags)
        if tpot is not None:
            self.instruments.tpot.observe(tpot, tags=self.tags)

    def start(self) -> EngineMetrics:
        """Update every `interval_s` from a daemon thread; the engine's loop never waits on it."""
        self._thread = threading.Thread(target=self._run, name="llava-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception:  # a metrics hiccup must never take the replica down
                log.exception("updating the engine metrics failed")
