"""The replica's view of its engine: alive, and stepping while it has work."""

from __future__ import annotations

import logging

from actors.health import EngineWatch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counters(steps: int) -> dict[str, float]:
    return {"steps": steps, "finished": 0, "failed": 0, "cancelled": 0, "running": 1}


def test_a_stepping_or_idle_engine_is_healthy():
    clock = Clock()
    watch = EngineWatch(5.0, clock)
    for k in range(10):  # steps keep coming while requests run
        clock.now += 3
        assert watch.verdict(True, counters(k), in_flight=2) is None
    clock.now += 100  # idle for long: no work, no stall
    assert watch.verdict(True, counters(9), in_flight=0) is None


def test_no_step_for_longer_than_the_limit_with_work_is_a_stall():
    clock = Clock()
    watch = EngineWatch(5.0, clock)
    assert watch.verdict(True, counters(3), in_flight=1) is None
    clock.now = 4.0
    assert watch.verdict(True, counters(3), in_flight=1) is None
    clock.now = 6.0
    reason = watch.verdict(True, counters(3), in_flight=1)
    assert reason and "no progress for 6 s" in reason and "1 request(s)" in reason
    clock.now = 7.0  # a step at last: healthy again
    assert watch.verdict(True, counters(4), in_flight=1) is None


def test_a_dead_loop_is_unhealthy_and_logged_once(caplog):
    watch = EngineWatch(60.0, Clock())
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        reasons = [watch.verdict(False, counters(1), in_flight=k % 2) for k in range(20)]
    assert set(reasons) == {"the engine's generation loop has stopped"}
    assert len([r for r in caplog.records if "replica unhealthy" in r.getMessage()]) == 1
