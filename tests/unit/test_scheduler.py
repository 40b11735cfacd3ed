"""The scheduler alone: hand-made requests and fake model outputs, no model, no threads, no sleeps."""

from __future__ import annotations

from actors.scheduler import Image, Plan, Request, Scheduler, Status

EOS = 2


def _scheduler(slots: int = 4, slot_tokens: int = 64, batch_tokens: int = 32, prefix_tokens: int = 64,
               min_chunk: int = 4) -> Scheduler:
    return Scheduler(slots, slot_tokens, batch_tokens, prefix_tokens, frozenset({EOS}), min_chunk)


def _request(key: str, length: int = 8, new: int = 3, image: str | None = None, image_len: int = 4) -> Request:
    images = (Image(1, image_len, image),) if image else ()
    prompt = [10] + [5] * image_len + [11] * (length - 1 - image_len) if image else [10] * length
    return Request(key, prompt, new, images)


def _run(s: Scheduler, plan: Plan, token: int = 7) -> list[Request]:
    """What a model would give: `token` for every chunk that ends its prompt and every decode row."""
    outputs = {c.request.key: token for c in plan.chunks if c.last}
    outputs.update({r.key: token for r in plan.decode})
    return s.update(plan, outputs)


def test_admission_follows_arrival_order_and_the_slots():
    s = _scheduler(slots=2)
    a, b, c = _request("a"), _request("b"), _request("c")
    for r in (a, b, c):
        assert s.add(r)
    plan = s.schedule()
    assert [ch.request.key for ch in plan.chunks] == ["a", "b"] and c.status is Status.WAITING
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    _run(s, plan)
    assert a.status is b.status is Status.DECODING and (a.tokens, b.tokens) == ([7], [7])
    s.finish(a, "stop")
    plan = s.schedule()  # a's slot goes to the last running request, then c is admitted behind it
    assert [(m.request.key, m.src, m.dst) for m in plan.moves] == [("b", 1, 0)]
    assert (b.slot, c.slot) == (0, 1) and plan.decode == [b] and plan.view == [b]
    assert [ch.request.key for ch in plan.chunks] == ["c"]  # b's next token and c's prompt in one step


def test_decoding_goes_on_while_a_long_prompt_is_chunked_in_the_budget_left():
    s = _scheduler(batch_tokens=16)
    short, long = _request("short", 8, new=5), _request("long", 40)
    s.add(short)
    _run(s, s.schedule())
    s.add(long)
    spans, decoded = [], []
    while long.status is not Status.DECODING:
        plan = s.schedule()
        spans += [(c.start, c.end) for c in plan.chunks]
        decoded.append([r.key for r in plan.decode])
        _run(s, plan)
    assert spans == [(0, 15), (15, 30), (30, 40)]  # 16 tokens a step, one of them short's
    assert decoded == [["short"]] * 3 and len(short.tokens) == 4
    assert s.counters.prefill_tokens_computed == 48 == s.counters.prefill_tokens_submitted


def test_a_prefill_always_moves_however_many_requests_decode():
    s = _scheduler(slots=8, batch_tokens=4)
    for k in range(6):
        s.add(_request(f"d{k}", 4, new=50))
    _run(s, s.schedule())
    while any(r.status is Status.PREFILLING for r in s.running):
        _run(s, s.schedule())
    s.add(late := _request("late", 40))
    plan = s.schedule()
    assert len(plan.decode) == 6 and plan.chunks[0].request is late and plan.chunks[0].end == s.min_chunk


def test_a_shared_image_prefix_is_computed_once_and_followers_wait_for_it():
    s = _scheduler(batch_tokens=64)
    leader, follower, other = _request("l", image="img"), _request("f", image="img"), _request("o", image="x")
    for r in (leader, follower, other):
        s.add(r)
    plan = s.schedule()
    assert [c.request.key for c in plan.chunks] == ["l", "o"]  # the follower does not hold back "o"
    assert plan.chunks[0].store_prefix == leader.prefix and s.stats()["waiting_on_prefill"] == 1
    _run(s, plan)
    plan = s.schedule()
    chunk = plan.chunks[0]
    assert (chunk.request, chunk.copy_prefix, chunk.start, chunk.end) == (follower, leader.prefix, 5, 8)
    _run(s, plan)
    assert s.counters.prefill_tokens_matched == 5 and s.counters.prefill_tokens_computed == 8 + 8 + 3


def test_a_prompt_that_is_all_prefix_still_computes_its_last_position():
    s = _scheduler()
    s.add(first := _request("a", length=5, image="img"))  # one text token, four image tokens
    _run(s, s.schedule())
    s.add(second := _request("b", length=5, image="img"))
    chunk = s.schedule().chunks[0]
    assert chunk.request is second and (chunk.start, chunk.end, chunk.last) == (4, 5, True)
    assert first.prefix == second.prefix


def test_cancel_in_every_state():
    s = _scheduler(slots=2)
    leader, follower, waiting = _request("l", image="img"), _request("f", image="img"), _request("w")
    for r in (leader, follower, waiting):
        s.add(r)
    s.schedule()  # leader and waiting admitted, follower waits on the leader's prefix
    assert s.cancel(leader)  # a leader cancelled mid-prefill: its follower may start (and lead)
    assert leader.status is Status.FINISHED and leader.finish_reason == "cancelled"
    plan = s.schedule()
    assert follower.slot is not None and plan.chunks[-1].store_prefix == follower.prefix
    assert s.cancel(waiting) and not s.cancel(waiting)  # twice is a no-op
    _run(s, s.schedule())
    assert s.cancel(follower) and s.running == [] and s.counters.cancelled == 3


def test_endings_by_end_of_sequence_length_and_failure():
    s = _scheduler()
    eos, length, broken = _request("e", new=5), _request("n", new=2), _request("x")
    for r in (eos, length, broken):
        s.add(r)
    plan = s.schedule()
    s.fail(broken, "generate: RuntimeError: boom")
    s.update(plan, {"e": 7, "n": 7})  # the failed request gets no token and is skipped
    s.update(s.schedule(), {"e": EOS, "n": 9})
    assert (eos.finish_reason, eos.tokens) == ("stop", [7, EOS])
    assert (length.finish_reason, length.tokens) == ("length", [7, 9])
    assert broken.error.startswith("generate:") and s.counters.failed == 1 and s.running == []


def test_a_request_no_slot_can_hold_fails_at_once():
    s = _scheduler(slot_tokens=16)
    big = _request("big", length=10, new=10)
    assert not s.add(big) and big.status is Status.FINISHED and big.error.startswith("generate: ") and "a slot holds 16" in big.error


def test_a_move_copies_what_its_request_holds_when_applied():
    s = _scheduler(slots=3)
    a, b, c = _request("a"), _request("b"), _request("c")
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    s.update(plan, {"a": EOS, "b": 7, "c": 7})  # a ends with the first token: c moves into slot 0
    plan = s.schedule()
    move = plan.moves[0]
    assert (move.request, move.src, move.dst, move.length) == (c, 2, 0, 8)
    assert [r.slot for r in plan.view] == [0, 1] and plan.decode == [c, b]


def test_pending_moves_are_handed_over_once_between_steps():
    s = _scheduler(slots=3)
    a, b, c = _request("a"), _request("b"), _request("c")
    for r in (a, b, c):
        s.add(r)
    _run(s, s.schedule())
    s.finish(a, "stop")  # c moves into a's slot at once; its KV must follow before anyone reads it
    moves, _ = s.pending()
    assert [(m.request.key, m.src, m.dst) for m in moves] == [("c", 2, 0)] and c.slot == 0
    assert s.pending() == ([], []) and s.schedule().moves == []
