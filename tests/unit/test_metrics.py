"""Engine stats snapshots turned into metric updates: counters by growth, gauges by level, and
per-request latencies, from the real engine's traffic (tests/integration/test_serve_metrics.py
reads them back from Prometheus)."""

from __future__ import annotations

import threading

from actors import metrics
from actors.scheduler import Request, Scheduler
from pipeline.config import SamplingParams
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest, GenerationResult
from tests.helpers import encode, noise_image


def _ask(engine, image: bytes, question: str) -> GenerationResult:
    prepared = prepare(image, engine.spec)
    request = GenerationRequest(engine.format_question(question, 1), [prepared.tiles], [prepared.size],
                                SamplingParams(max_new_tokens=6), [prepared.digest])
    return engine.generate([request])[0]


def _idle(engine) -> dict:
    """The engine's snapshot once no request runs or waits (it is replaced after each step)."""
    for _ in range(100):
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        threading.Event().wait(0.05)
    raise AssertionError(f"the engine did not go idle: {engine.stats()}")


def test_two_questions_about_one_image_grow_the_counters_by_what_the_engine_did(engine):
    before = metrics.counter_totals(_idle(engine))
    image = encode(noise_image(77, 51, seed=9001))  # in no other test: the first ask must encode it
    first = _ask(engine, image, "What is shown in this image?")
    second = _ask(engine, image, "Describe it.")
    assert first.error is None and second.error is None
    stats = _idle(engine)
    grown = metrics.counter_deltas(before, metrics.counter_totals(stats))
    assert grown["llava_engine_image_cache_misses"] == 1
    assert grown["llava_engine_image_cache_hits"] == 1
    # the second prompt's image prefix came from the first one's KV, the rest was computed
    assert 0 < grown["llava_engine_prefill_tokens_matched"] < first.num_input_tokens
    assert grown["llava_engine_prefill_tokens_computed"] == \
        first.num_input_tokens + second.num_input_tokens - grown["llava_engine_prefill_tokens_matched"]
    levels = metrics.gauge_values(stats)
    assert levels["llava_engine_requests_running"] == levels["llava_engine_requests_waiting"] == 0
    assert levels["llava_engine_kv_cache_tokens_used"] == 0
    assert levels["llava_engine_kv_cache_tokens_total"] == engine.loop.scheduler.slots * engine.kv_capacity_tokens()


def test_kv_gauges_count_the_positions_running_requests_fill():
    s = Scheduler(slots=2, slot_tokens=64, batch_tokens=32, prefix_tokens=64, eos_ids=frozenset({2}), min_chunk=4)
    a, b = Request("a", [10] * 8, 3), Request("b", [10] * 5, 3)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    s.update(plan, {"a": 7, "b": 7})  # both prompts whole in one step, a first token each
    plan = s.schedule()
    s.update(plan, {"a": 7, "b": 7})  # the first tokens go in, second tokens come out
    levels = metrics.gauge_values(s.stats())
    assert levels["llava_engine_kv_cache_tokens_used"] == (8 + 1) + (5 + 1)
    assert levels["llava_engine_kv_cache_tokens_total"] == 2 * 64
    assert levels["llava_engine_requests_running"] == 2 and levels["llava_engine_requests_waiting"] == 0


def test_counters_take_growth_and_a_restarted_loop_counts_from_zero():
    assert metrics.counter_deltas({"x": 5, "y": 3}, {"x": 9, "y": 3}) == {"x": 4}  # no growth, no update
    assert metrics.counter_deltas({"x": 5}, {"x": 2}) == {"x": 2}  # a new loop's totals start again at 0
    assert metrics.counter_deltas({}, {"x": 1}) == {"x": 1}


def test_the_static_scheduler_reports_only_what_it_keeps(static_engine):
    stats = static_engine.stats()
    assert metrics.counter_totals(stats) == {} and metrics.gauge_values(stats) == {}
    assert metrics.latencies(GenerationResult(response="a", num_output_tokens=3, generation_ms=90.0)) == (None, None)


def test_latencies_are_the_engines_own_timings(engine):
    result = _ask(engine, encode(noise_image(40, 40, seed=9002)), "Describe it.")
    ttft, tpot = metrics.latencies(result)
    assert result.num_output_tokens == 6 and 0 < ttft == result.first_token_ms / 1000
    assert tpot == (result.generation_ms - result.first_token_ms) / 1000 / 5 > 0
    one = GenerationResult(response="a", num_output_tokens=1, generation_ms=30.0, first_token_ms=30.0)
    assert metrics.latencies(one) == (0.03, None)
    assert metrics.latencies(GenerationResult(error="generate: broke", first_token_ms=5.0)) == (None, None)


def test_replica_metrics_follow_the_engine_outside_serve(engine):
    """Outside a replica the process stands for it; updates take only the growth since the last."""
    tags = metrics.replica_tags()
    assert tags["replica"].startswith("pid-") and set(tags) == set(metrics.TAG_KEYS)
    recorder = metrics.EngineMetrics(engine, interval_s=0.05).start()
    try:
        _ask(engine, encode(noise_image(30, 60, seed=9003)), "What is shown in this image?")
        _idle(engine)
        threading.Event().wait(0.2)
        assert recorder._totals == metrics.counter_totals(engine.stats())
    finally:
        recorder.stop()
    metrics.loop_restarted()
