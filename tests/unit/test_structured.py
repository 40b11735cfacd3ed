"""The endpoint's check of a constrained request on the real engine: a constraint that does not
compile says why, one that takes too long is refused at the time limit, and compiling never holds
the event loop."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from actors.structured import answer_error
from pipeline.config import Constraint, SamplingParams


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _enum(values: int) -> Constraint:
    """A schema that takes long to compile (fresh, so never from the compile cache)."""
    tag = uuid.uuid4().hex
    return Constraint.json_schema({"enum": [f"{tag} value {i}" for i in range(values)]})


def test_constraints_that_compile_pass_and_the_others_say_why(engine, pool):
    def check(params: SamplingParams) -> str | None:
        return asyncio.run(answer_error(engine, params, pool))

    assert check(SamplingParams()) is None and check(SamplingParams(logprobs=3)) is None
    assert check(SamplingParams(constraint=Constraint.choices(["yes", "no"]))) is None
    assert "unclosed character class" in check(SamplingParams(constraint=Constraint("regex", "[a-")))
    nested = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}})
    assert check(SamplingParams(constraint=nested)).startswith("the json schema does not compile")


def test_a_slow_compile_is_refused_at_the_limit_and_never_holds_the_event_loop(engine, pool):
    async def run(constraint: Constraint, limit_s: float) -> tuple[str | None, float, float]:
        """The check's answer, the longest the event loop went without a tick, and the time it took."""
        gaps, done, start = [], asyncio.Event(), time.perf_counter()

        async def ticker() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async def check() -> str | None:
            try:
                return await answer_error(engine, SamplingParams(constraint=constraint), pool, limit_s)
            finally:
                done.set()

        error, _ = await asyncio.gather(check(), ticker())
        return error, max(gaps, default=0.0), time.perf_counter() - start

    error, _, _ = asyncio.run(run(_enum(20_000), 0.001))
    assert error == "the JSON schema did not compile within 0.001 s; simplify it"
    huge = _enum(150_000)
    gc.disable()  # a full collection of the test process's objects is no stall of ours
    try:
        error, gap, took = asyncio.run(run(huge, 30))  # llguidance refuses it after about a second
    finally:
        gc.enable()
    assert error is not None and "too big" in error
    assert gap < took / 3, f"the event loop stalled for {gap:.3f} s of the {took:.3f} s compile"
