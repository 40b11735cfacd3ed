"""The continuous loop: reference answers whatever runs beside them, one encoding and one prefill
per image, seeded sampling independent of traffic, stop strings, cancellation, failures alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from actors.engine import Engine
from pipeline.config import EngineConfig, SamplingParams
from pipeline.preprocess import decode, prepare
from pipeline.schemas import GenerationRequest
from jobs.synthetic import heldout_seeds, make_sample
from tests.faults import carrying, fail_steps
from tests.helpers import encode, noise_image, reference_tokens

SHAPES = str(Path(__file__).resolve().parents[2] / "actors" / "checkpoints" / "tiny-shapes")
GRID_SIZES = [(64, 64), (300, 80), (40, 190), (90, 33), (640, 480), (33, 400)]


def _request(engine, images: list[bytes], question: str, params: SamplingParams | None = None) -> GenerationRequest:
    prepared = [prepare(data, engine.spec) for data in images]
    return GenerationRequest(
        prompt=engine.format_question(question, len(images)),
        tiles=[p.tiles for p in prepared],
        image_sizes=[p.size for p in prepared],
        params=params,
        image_digests=[p.digest for p in prepared],
    )


def _zoo() -> list[tuple[list[bytes], str, int]]:
    """1-3 images of sizes that give different grids, several questions per image, answer limits 1-12."""
    images = [encode(noise_image(*GRID_SIZES[k], seed=k)) for k in range(len(GRID_SIZES))]
    questions = ["What is shown in this image?", "Describe it.", "Is there text?" + " Be brief." * 4]
    rows = []
    for i in range(12):
        count = 1 + i % 3
        row_images = [images[(i + k) % len(images)] for k in range(count)]
        rows.append((row_images, questions[i % 3], 1 + (5 * i) % 12))
    return rows


def test_greedy_tokens_equal_the_reference_amid_mixed_traffic(engine, reference):
    rows = _zoo()
    requests = [_request(engine, imgs, q, SamplingParams(max_new_tokens=n)) for imgs, q, n in rows]
    results = engine.generate(requests)
    for (imgs, _, n), req, got in zip(rows, requests, results):
        expected = reference_tokens(reference, [decode(d) for d in imgs], req.prompt, n)
        assert got.error is None
        assert got.token_ids == expected
        assert got.finish_reason == ("stop" if expected[-1] == 2 else "length")
        assert got.num_input_tokens > got.num_image_tokens > 0


def test_answers_that_end_early_equal_the_reference():
    """The shipped shapes model ends its answers with end-of-sequence after a word or a sentence."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    engine = Engine(EngineConfig(model=SHAPES, max_new_tokens=16, page_size=16))
    reference = (AutoProcessor.from_pretrained(SHAPES), LlavaNextForConditionalGeneration.from_pretrained(SHAPES))
    try:
        examples = [make_sample(seed) for seed in heldout_seeds(500, 3)]
        asks = [(ex, q) for ex in examples for q in ("What shape is in the image?", "Describe the image.")]
        requests = [_request(engine, [encode(ex.image)], q) for ex, q in asks]
        results = engine.generate(requests)
    finally:
        engine.close()
    for (ex, _), req, got in zip(asks, requests, results):
        expected = reference_tokens(reference, [ex.image], req.prompt, 16)
        assert got.token_ids == expected and got.finish_reason == "stop" and len(expected) < 16


def test_three_questions_on_one_image_encode_it_once_and_prefill_it_once(engine):
    image = [encode(noise_image(300, 80, seed=77))]
    before = engine.stats()
    questions = ["What is shown in this image?", "Describe the colours.", "Count the objects."]
    results = engine.generate([_request(engine, image, q) for q in questions])
    after = engine.stats()
    assert all(r.error is None for r in results)
    assert after["image_encodings_requested"] - before["image_encodings_requested"] == 3
    assert after["image_encodings_run"] - before["image_encodings_run"] == 1
    submitted = after["prefill_tokens_submitted"] - before["prefill_tokens_submitted"]
    computed = after["prefill_tokens_computed"] - before["prefill_tokens_computed"]
    assert submitted == sum(r.num_input_tokens for r in results)
    assert computed <= 0.6 * submitted, (computed, submitted)
    alone = [engine.generate([_request(engine, image, q)])[0].token_ids for q in questions]
    assert [r.token_ids for r in results] == alone


def test_a_seeded_request_gives_the_same_tokens_alone_and_amid_traffic(engine):
    image = [encode(noise_image(64, 64, seed=5))]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    seeded = _request(engine, image, "What is shown in this image?", params)
    alone = engine.generate([seeded])[0].token_ids
    others = [_request(engine, imgs, q, SamplingParams(max_new_tokens=n, temperature=0.7 * (i % 2)))
              for i, (imgs, q, n) in enumerate(_zoo()[:8])]
    mixed = engine.generate(others[:4] + [seeded] + others[4:])[4].token_ids
    assert mixed == alone and len(alone) == 12
    other_seed = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=99)
    different = engine.generate([_request(engine, image, "What is shown in this image?", other_seed)])[0]
    assert different.token_ids != alone


def test_a_stop_string_ends_the_answer_and_usage_counts_what_was_made(engine):
    request = _request(engine, [encode(noise_image(90, 33, seed=3))], "What is shown in this image?")
    full = engine.generate([request])[0]
    stop = full.response[len(full.response) // 2 :][:2]
    cut = full.response.index(stop)
    request.params = SamplingParams(max_new_tokens=12, stop=(stop,))
    got = engine.generate([request])[0]
    assert got.response == full.response[:cut] and got.finish_reason == "stop"
    made = next(k for k in range(1, 13) if stop in engine.decode(full.token_ids[:k]))
    assert got.num_output_tokens == made and got.token_ids == full.token_ids[:made]


def test_tokens_stream_while_generating_and_a_cancel_frees_the_slot(engine):
    request = _request(engine, [encode(noise_image(40, 190, seed=4))], "Describe it.", SamplingParams(max_new_tokens=400))
    seen: list[int] = []
    cancelled = threading.Event()

    def on_update(sub):
        seen.append(len(sub.tracker.tokens))
        if len(sub.tracker.tokens) >= 5 and not cancelled.is_set():
            cancelled.set()
            engine.cancel(sub)

    sub = engine.submit(request, on_update)
    result = sub.future.result(timeout=60)
    assert result.finish_reason == "cancelled" and 5 <= result.num_output_tokens < 400
    assert seen[:5] == [1, 2, 3, 4, 5]
    assert engine.stats()["running"] == 0


def test_a_request_no_slot_can_hold_fails_alone(tiny_model):
    """A KV cache of 0.25 MB for two slots: 204 tokens each (a quarter more kept for prefixes)."""
    small = Engine(EngineConfig(model=tiny_model, max_new_tokens=12, page_size=16, kv_cache_mb=0.25,
                                max_running_requests=2))
    try:
        assert small.loop.capacity_tokens == 204
        image = [encode(noise_image(64, 64, seed=8))]
        huge = _request(small, image, "What?", SamplingParams(max_new_tokens=600))
        good = _request(small, image, "What?")
        results = small.generate([huge, good])
        assert results[0].error.startswith("generate: the request needs") and "--kv-cache-mb" in results[0].error
        assert results[1].error is None and results[1].num_output_tokens == 12
    finally:
        small.close()


def test_an_answer_never_runs_past_the_context(any_engine):
    """The job's --max-new-tokens beyond the context is cut to the room the prompt leaves (two
    streams generated ~7.8k tokens on a 1,024-token model before)."""
    image = [encode(noise_image(64, 64, seed=8))]
    request = _request(any_engine, image, "What?", SamplingParams(max_new_tokens=5000))
    result = any_engine.generate([request])[0]
    assert result.error is None and result.finish_reason == "length"  # the random model never says </s>
    assert result.num_input_tokens + result.num_output_tokens == any_engine.context


def _settles(engine, **expected) -> bool:
    """Whether the engine's counters reach `expected` within a few seconds."""
    for _ in range(100):
        stats = engine.stats()
        if all(stats[k] == v for k, v in expected.items()):
            return True
        threading.Event().wait(0.05)
    return False


def _marker(engine, text: str) -> list[int]:
    """Token ids of `text` that no ordinary prompt here carries."""
    ordinary = set(engine.tokenizer(engine.format_question("What is shown in this image?", 1))["input_ids"])
    return sorted(set(engine.tokenizer(text)["input_ids"]) - ordinary - set(engine.tokenizer.all_special_ids))


def test_a_follower_cancelled_at_its_gate_leaves_nothing_behind(engine):
    """A request waiting for another's prefill of the same image is cancelled (its client left):
    it must neither start later nor stay counted as running, and the image stays usable."""
    image = [encode(noise_image(300, 80, seed=81))]
    hold, go = threading.Event(), threading.Event()
    marker = torch.tensor(_marker(engine, "zebra quartz"))

    def block(ids):  # the leader's prefill waits until the test has cancelled its follower
        if torch.isin(ids, marker).any():
            hold.set()
            go.wait(30)
        return None

    restore = fail_steps(engine, block)
    try:
        leader = engine.submit(_request(engine, image, "Explain zebra quartz."))
        assert hold.wait(30)  # the leader is prefilling
        follower = engine.submit(_request(engine, image, "Describe the colours."))
        engine.cancel(follower)
    finally:
        go.set()
        restore()
    assert follower.future.result(timeout=60).finish_reason == "cancelled"
    assert leader.future.result(timeout=60).error is None
    assert _settles(engine, running=0, waiting=0, waiting_on_prefill=0)
    again = engine.generate([_request(engine, image, "Describe the colours.")])[0]
    assert again.error is None and again.num_output_tokens > 0


def test_a_request_that_breaks_a_prefill_fails_alone_and_the_others_are_answered(engine):
    images = [[encode(noise_image(*GRID_SIZES[k], seed=20 + k))] for k in range(4)]
    good = [_request(engine, imgs, "What is shown in this image?") for imgs in images]
    expected = [r.token_ids for r in engine.generate(good)]
    bad = _request(engine, images[0], "Explain zebra quartz.")
    restore = fail_steps(engine, carrying(_marker(engine, "zebra quartz")))
    try:
        results = engine.generate(good[:2] + [bad] + good[2:])
        assert results[2].error == "generate: RuntimeError: poisoned step"
        assert [r.token_ids for r in results[:2] + results[3:]] == expected
        assert engine.generate(good[:1])[0].token_ids == expected[0]
    finally:
        restore()


def test_a_request_that_breaks_a_decode_step_fails_alone(engine):
    """A decode step of many requests fails: each is run alone, and only the one that breaks it fails."""
    images = [[encode(noise_image(*GRID_SIZES[k], seed=60 + k))] for k in range(6)]
    requests = [_request(engine, imgs, "What is shown in this image?") for imgs in images]
    answers = [r.token_ids for r in engine.generate(requests)]
    prompts = {t for r in requests for t in engine.tokenize(r)[0]}
    # A token only the last request generates (and not first): the steps that carry it are its own.
    others = {t for a in answers[:-1] for t in a}
    poison = sorted(set(answers[-1][1:]) - others - prompts)
    assert poison, answers
    restore = fail_steps(engine, carrying(poison))
    try:
        isolated = engine.stats()["isolated_steps"]
        results = engine.generate(requests)
        assert results[-1].error == "generate: RuntimeError: poisoned step"
        assert [r.token_ids for r in results[:-1]] == answers[:-1]
        assert engine.stats()["isolated_steps"] > isolated
    finally:
        restore()


def test_out_of_memory_shrinks_the_prefill_step_instead_of_failing_rows(tiny_model, engine):
    requests = lambda e: [_request(e, [encode(noise_image(*GRID_SIZES[k % 4], seed=k))], "What is it?",  # noqa: E731
                                   SamplingParams(max_new_tokens=6)) for k in range(6)]
    expected = [r.token_ids for r in engine.generate(requests(engine))]
    small = Engine(EngineConfig(model=tiny_model, max_new_tokens=6, page_size=16, max_batch_tokens=512))
    try:
        fail_steps(small, lambda ids: torch.OutOfMemoryError("injected") if ids.numel() > 100 else None)
        results = small.generate(requests(small))
        assert [r.token_ids for r in results] == expected and all(r.error is None for r in results)
        assert small.loop.scheduler.batch_tokens <= 64
    finally:
        small.close()
    late = small.submit(requests(small)[0]).future.result(timeout=5)
    assert late.error == "generate: the engine was shut down"


def test_a_small_image_cache_evicts_and_answers_stay_right(tiny_model, engine):
    small = Engine(EngineConfig(model=tiny_model, max_new_tokens=8, page_size=16, image_cache_mb=0.05))
    try:
        rows = [[encode(noise_image(*GRID_SIZES[k % 4], seed=40 + k))] for k in range(8)]
        # Two waves: features the running requests need are never evicted, and all eight may be
        # admitted in one step, so only a second wave must make room by evicting the first's.
        got = [g for wave in (rows[:4], rows[4:]) for g in small.generate([_request(small, imgs, "What is it?")
                                                                          for imgs in wave])]
        want = engine.generate([_request(engine, imgs, "What is it?", SamplingParams(max_new_tokens=8)) for imgs in rows])
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert small.stats()["image_cache_evictions"] > 0
    finally:
        small.close()


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_the_scheduler_in_use_is_reported(tiny_model, scheduler):
    engine = Engine(EngineConfig(model=tiny_model, scheduler=scheduler))
    try:
        assert engine.scheduler == scheduler
        assert ("running" in engine.stats()) == (scheduler == "continuous")
    finally:
        engine.close()


def test_the_static_path_of_a_continuous_engine_still_equals_the_loop(engine):
    """The two schedulers share one model; neither may change what the other computes."""
    rows = [_request(engine, imgs, q, SamplingParams(max_new_tokens=n)) for imgs, q, n in _zoo()[:6]]
    assert [r.token_ids for r in engine.generate_static(rows)] == [r.token_ids for r in engine.generate(rows)]


def test_the_memory_plan_a_gpu_gets(monkeypatch):
    """The slots a GPU engine would size from its free memory (80 %), and what --kv-cache-mb and a
    CPU get, checked without CUDA."""
    from actors.continuous import memory_plan

    cfg = EngineConfig(model="m", max_running_requests=4, page_size=16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**20, 80 * 2**20))
    per_token = 2**20 // 100  # a hundred tokens a megabyte
    slot, prefix = memory_plan(cfg, 4096, per_token, torch.device("cuda"))
    budget = int(40 * 2**20 * 0.8) // per_token  # 3,200 tokens: four slots of 640, and 640 for prefixes
    assert (slot, prefix) == (int(budget / 1.25) // 4, budget - 4 * (int(budget / 1.25) // 4)) == (640, 640)
    assert memory_plan(cfg, 500, per_token, torch.device("cuda"))[0] == 500  # never past the context
    assert memory_plan(cfg, 4096, per_token, torch.device("cpu"))[0] == 1024
    assert memory_plan(EngineConfig(model="m", max_running_requests=4, kv_cache_mb=5), 4096, per_token,
                       torch.device("cpu"))[0] == 100


def test_the_gpu_settings_give_the_same_tokens_on_cpu(tiny_model, engine, monkeypatch):
    """What only a GPU would run: KV slots sized from free memory, 8,192 tokens a step (every
    prompt of the zoo in one step with the decode rows), decode rows through `sdpa` (a CPU runs
    `unfused_decode`), forced here on CPU."""
    from actors import attention, continuous

    monkeypatch.setattr(attention, "fused_decode", lambda device: True)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (64 * 2**20, 128 * 2**20))
    real_plan = continuous.memory_plan
    monkeypatch.setattr(continuous, "memory_plan",
                        lambda cfg, context, per_token, device: real_plan(cfg, context, per_token, torch.device("cuda")))
    gpu_like = Engine(EngineConfig(model=tiny_model, max_new_tokens=12, page_size=16, max_batch_tokens=8192))
    try:
        assert gpu_like.loop.capacity_tokens == 1024  # the context: 64 MB leaves more than that a slot
        rows = [_request(engine, imgs, q, SamplingParams(max_new_tokens=n)) for imgs, q, n in _zoo()]
        got = gpu_like.generate(rows)
        assert [g.token_ids for g in got] == [r.token_ids for r in engine.generate(rows)]
        # Every prompt in the first step (those sharing an image prefix in the second), then the answers.
        assert gpu_like.stats()["steps"] <= 2 + 12
    finally:
        gpu_like.close()
