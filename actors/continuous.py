"""The continuous scheduler: requests join and leave the running batch at every token step.

One thread owns the loop and everything it holds: it takes new requests and cancels from a queue,
asks the scheduler (actors/scheduler.py) for the next step, has the runner (actors/runner.py)
compute it, chooses the tokens (actors/sampling.py), hands them back to the scheduler, and
resolves the requests that ended. Other threads only put things in the queue (`submit`,
`cancel`) and read the counters the loop publishes after each step (`stats`): nothing is locked
because nothing is shared.

Glossary (see also the scheduler's)
- submission: a caller's handle on one request: its future (a `GenerationResult`, errors
  included), its text so far (`tracker`) and an optional listener called as tokens arrive.
- isolation: when a batched decode step raises, each of its requests is run alone, so the one
  that breaks the model fails by itself and the others are answered; after out-of-memory in a
  prefill the step's token budget is halved (down to one page) instead.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.answer import Answer, ChoiceTokens, MaskTimes, choice_probs, constrain, take
from actors.constraints import NO_COMPILES, ConstraintError, Grammars
from actors.runner import ImageEncodingError, Runner
from actors.sampling import choose
from actors.scheduler import Image, Plan, Request, Scheduler, Status
from actors.text import TextTracker
from pipeline.config import EngineConfig, SamplingParams
from pipeline.schemas import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

CPU_SLOT_TOKENS = 1024  # without --kv-cache-mb on CPU: every running request may reach this
CPU_BATCH_TOKENS = 1024


@dataclass(eq=False)
class Submission:
    """One request in the loop, as its caller sees it."""

    key: str
    request: GenerationRequest
    params: SamplingParams
    tracker: TextTracker
    on_update: Callable[["Submission"], None] | None = None
    future: Future = field(default_factory=Future)
    prompt_tokens: int = 0
    image_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    state: Request | None = None
    answer: Answer | None = None
    choice_probs: dict[str, float] | None = None
    settled: list[int] | None = None

    @property
    def done(self) -> bool:
        return self.future.done()

    def image_inputs(self, k: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Image k's uint8 tiles and size, for the runner's vision tower."""
        return self.request.tiles[k], tuple(int(v) for v in self.request.image_sizes[k])


@dataclass
class StepTimes:
    """Seconds the loop spent stepping (the model and choosing tokens), in all steps and in those
    that only decode, with their rows: the time per decoding step that constraints are measured
    against (jobs/bench/constrained.py)."""

    step_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0
    decode_step_s: float = 0.0

    def add(self, seconds: float, plan: Plan) -> None:
        self.step_s += seconds
        if not plan.chunks:
            self.decode_steps += 1
            self.decode_rows += len(plan.decode)
            self.decode_step_s += seconds

    def stats(self) -> dict[str, float]:
        return {"step_s": round(self.step_s, 4), "decode_only_steps": self.decode_steps,
                "decode_only_rows": self.decode_rows, "decode_only_step_s": round(self.decode_step_s, 4)}


def image_runs(ids: list[int], image_token: int, counts: list[int], digests: list[str]) -> tuple[Image, ...]:
    """Each image's run of placeholder ids in an expanded prompt, with its digest (adjacent images'
    runs touch, so each is cut by its own token count)."""
    images, i = [], 0
    for count, digest in zip(counts, digests):
        while ids[i] != image_token:
            i += 1
        images.append(Image(i, count, digest))
        i += count
    return tuple(images)


def memory_plan(cfg: EngineConfig, context: int, bytes_per_token: int, device: torch.device) -> tuple[int, int]:
    """(tokens a slot holds, tokens of stored prefixes) from --kv-cache-mb, else from free GPU
    memory, else on CPU room for every running request at up to 1,024 tokens. A quarter more
    than the slots hold is kept for stored prefixes."""
    slots = cfg.max_running_requests
    if cfg.kv_cache_mb is not None:
        budget = int(cfg.kv_cache_mb * 2**20) // bytes_per_token
    elif device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.8) // bytes_per_token
    else:
        budget = int(slots * min(context, CPU_SLOT_TOKENS) * 1.25)
    slot_tokens = max(cfg.page_size, min(context, int(budget / 1.25) // slots))
    return slot_tokens, max(slot_tokens, budget - slots * slot_tokens)


class ContinuousLoop:
    """Per-token scheduling around one checkpoint's model; `submit`, `cancel` and `stats` from any thread."""

    def __init__(self, checkpoint: Any, cfg: EngineConfig):
        self.checkpoint = checkpoint
        device = checkpoint.device
        per_token = Runner.kv_bytes_per_token(checkpoint)
        self.slot_tokens, prefix_tokens = memory_plan(cfg, checkpoint.context, per_token, device)
        batch_tokens = cfg.max_batch_tokens or (CPU_BATCH_TOKENS if device.type != "cuda" else 8192)
        self.runner = Runner(checkpoint, cfg.max_running_requests, self.slot_tokens,
                             int(cfg.image_cache_mb * 2**20), cfg.vision_batch_tiles)
        self.scheduler = Scheduler(cfg.max_running_requests, self.slot_tokens, batch_tokens, prefix_tokens,
                                   frozenset(checkpoint.eos_ids), min_chunk=cfg.page_size)
        self.page = cfg.page_size
        self._inbox: queue.SimpleQueue[tuple[str, Submission]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._keys = iter(range(1 << 62))
        self._failed: list[tuple[Request, str]] = []  # requests a step broke, ended after the step
        self.times, self.mask_times = StepTimes(), MaskTimes()
        self._grammars: Grammars | None = None  # once a constrained request came
        self._stats: dict[str, float] = self._snapshot()
        # Not a daemon: torch must not be stepping while the interpreter exits, so the loop stops
        # itself when the main thread has ended without calling `close`.
        self._thread = threading.Thread(target=self._run, name="llava-loop")
        self._thread.start()
        log.info("continuous scheduler: %d slots of %d tokens (%.0f MB of KV), %d tokens of stored prefixes, "
                 "%d tokens per prefill step", cfg.max_running_requests, self.slot_tokens,
                 cfg.max_running_requests * self.slot_tokens * per_token / 2**20, prefix_tokens, batch_tokens)

    # ---- from any thread ----------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request may hold: its prompt and its whole answer."""
        return self.slot_tokens

    def submit(self, request: GenerationRequest, on_update: Callable[[Submission], None] | None = None) -> Submission:
        """Queue one request; its future resolves to a `GenerationResult` (errors included)."""
        params = request.params or self.checkpoint.default_params()
        if params.temperature > 0 and params.seed is None:  # seeded now, so a re-run repeats its tokens
            params = dataclasses.replace(params, seed=random.randrange(2**31))
        sub = Submission(f"r{next(self._keys)}", request, params, TextTracker(self.checkpoint.decode, params.stop),
                         on_update)
        if self._closing.is_set():
            return self._resolve_error(sub, "generate: the engine was shut down")
        try:
            ids, sub.image_tokens = self.checkpoint.tokenize(request)
        except ValueError as exc:
            return self._resolve_error(sub, f"prompt: {exc}")
        sub.prompt_tokens = len(ids)
        sub.params = params = self.checkpoint.fit(len(ids), params)  # an answer never runs past the context
        if params.constraint is not None:
            self._grammars = self.checkpoint.grammars
        try:
            sub.answer = Answer.start(params, self._grammars)
        except ConstraintError as exc:
            return self._resolve_error(sub, f"prompt: {exc}")
        digests = request.image_digests or [self.checkpoint.digest(t, tuple(s))
                                            for t, s in zip(request.tiles, request.image_sizes)]
        counts = [self.checkpoint.spec.num_image_tokens(tuple(int(v) for v in s)) for s in request.image_sizes]
        images = image_runs(ids, self.checkpoint.image_token_id, counts, digests)
        sub.state = Request(sub.key, ids, params.max_new_tokens, images, payload=sub)
        self._inbox.put(("add", sub))
        self._wake.set()
        return sub

    def cancel(self, sub: Submission) -> None:
        """Stop a request (its client went away); its slot is free by the next step."""
        if not sub.done:
            self._inbox.put(("cancel", sub))
            self._wake.set()

    def stats(self) -> dict[str, float]:
        """The scheduler's and runner's counters, step and mask times, and the grammar cache's."""
        return dict(self._stats)

    def alive(self) -> bool:
        """Whether the loop thread still runs and takes requests (a replica's health check asks)."""
        return self._thread.is_alive() and not self._closing.is_set()

    def close(self) -> None:
        """Stop the loop; requests still open end with an error."""
        self._closing.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    # ---- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing.is_set() and threading.main_thread().is_alive():
                self._drain()
                plan = self.scheduler.schedule()
                if plan.empty:
                    self._stats = self._snapshot()
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
                    continue
                self.runner.apply(plan.moves, plan.evict)
                self._failed: list[tuple[Request, str]] = []
                start = time.perf_counter()
                tokens = self._step(plan)
                self.times.add(time.perf_counter() - start, plan)
                # Failures end their requests only now: ending one moves another request's slot,
                # which must not happen while the step still computes into slots.
                for request, error in self._failed:
                    self._fail(request, error)
                if tokens is not None:
                    self._after(self.scheduler.update(plan, tokens))
                self._stats = self._snapshot()
        except Exception:  # the loop itself broke: nothing can be answered any more
            log.exception("the generation loop stopped")
        finally:
            self._closing.set()
            self._drain()
            for request in [*self.scheduler.running, *self.scheduler.waiting]:
                self._fail(request, "generate: the engine was shut down")

    def _drain(self) -> None:
        while True:
            try:
                kind, sub = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if self._closing.is_set():
                    self._resolve_error(sub, "generate: the engine was shut down")
                elif not self.scheduler.add(sub.state):
                    self._resolve(sub)
            elif self.scheduler.cancel(sub.state):
                self._resolve(sub)

    def _step(self, plan: Plan) -> dict[str, int] | None:
        """The plan's tokens by request key; requests that broke the model are failed on the way.
        None when the step must be planned again (images that failed to encode, or a prefill out
        of memory, now with a smaller budget)."""
        try:
            self.runner.ensure_features([c.request for c in plan.chunks])
        except ImageEncodingError as exc:
            log.error("%s", exc)
            self._failed += [(c.request, f"generate: {exc}") for c in plan.chunks
                             if any(i.digest in exc.digests for i in c.request.images)]
            return None
        try:
            return self._compute(plan.chunks, plan.view, [r.status is Status.DECODING for r in plan.view])
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if plan.chunks and self.scheduler.batch_tokens > self.page:
                self.scheduler.batch_tokens = max(self.page, self.scheduler.batch_tokens // 2)
                log.warning("out of memory: %d tokens per step from now on", self.scheduler.batch_tokens)
                return None
            log.warning("out of memory on a step of %d request(s); running them one at a time", len(plan.requests))
        except Exception as exc:
            log.warning("a step of %d request(s) failed (%s: %s); running them one at a time",
                        len(plan.requests), type(exc).__name__, exc)
        self.scheduler.counters.isolated_steps += 1
        tokens: dict[str, int] = {}
        for request, chunks, view in [*((c.request, [c], []) for c in plan.chunks),
                                      *((r, [], [r]) for r in plan.decode)]:
            try:
                tokens.update(self._compute(chunks, view, [True] * len(view)))
            except Exception as exc:
                log.exception("request %s fails the model", request.key)
                self._failed.append((request, f"generate: {type(exc).__name__}: {exc}"))
        return tokens

    def _compute(self, chunks: list, view: list[Request], active: list[bool]) -> dict[str, int]:
        chosen, logits = self.runner.run(chunks, view, active)
        return self._choose(chosen, logits) if chosen else {}

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> dict[str, int]:
        """Each request's next token, under its constraint; its answer takes the token."""
        params = [r.payload.params for r in requests]
        positions = [len(r.prompt) + len(r.tokens) for r in requests]
        answers = [r.payload.answer for r in requests]
        chosen = choose(constrain(answers, logits, self.mask_times), params, positions)
        take(answers, logits, chosen, [not r.tokens for r in requests], self.mask_times)
        for k, request in enumerate(requests):
            sub: Submission = request.payload
            if sub.answer.first_logits is not None and sub.choice_probs is None:
                self._score_choices(request)
                chosen[k] = sub.settled[0] if sub.settled else chosen[k]
        return {r.key: t for r, t in zip(requests, chosen)}

    def _after(self, changed: list[Request]) -> None:
        """Choice scores, stop strings, listeners and endings for the requests that got a token; a
        request whose handling breaks fails alone, so the loop and the others go on."""
        for request in changed:
            try:
                self._after_one(request)
            except Exception as exc:
                log.exception("request %s failed after its step", request.key)
                self.scheduler.fail(request, f"generate: {type(exc).__name__}: {exc}")
                self._resolve(request.payload)

    def _after_one(self, request: Request) -> None:
        sub: Submission = request.payload
        if sub.first_token_s is None:
            sub.first_token_s = time.perf_counter() - sub.started
        if sub.settled:  # a greedy choice answer: the most probable choice, whole
            request.tokens, request.finish_reason = list(sub.settled), "stop"
            self.scheduler.finish(request, "stop")
        if sub.params.stop or sub.on_update is not None:
            if sub.tracker.update(request.tokens):
                self.scheduler.finish(request, "stop")
        if sub.answer.stopped and request.status is not Status.FINISHED:  # the grammar is complete
            self.scheduler.finish(request, "stop")
        if request.status is Status.FINISHED:
            self._resolve(sub)
        elif sub.on_update is not None:
            sub.on_update(sub)

    def _score_choices(self, request: Request) -> None:
        """Every choice's probability as the whole answer, from the request's prefilled prompt, in
        the step that made its first token: the slot holds its KV then, before any ending of the
        step moves slots. A greedy request's answer becomes the most probable choice (`settled`)."""
        sub: Submission = request.payload
        choices = ChoiceTokens.of(sub.params.constraint.options, self.checkpoint.tokenizer,
                                  min(self.checkpoint.eos_ids))
        rows = self.runner.score(request, sub.answer.first_logits, choices.ids)
        sub.choice_probs, best = choice_probs(choices, rows)
        if sub.params.temperature == 0 and rows[best] is not None:
            sub.answer.settle(choices.ids[best], rows[best])
            sub.settled = list(choices.ids[best])

    # ---- endings ------------------------------------------------------------------------------

    def _fail(self, request: Request, error: str) -> None:
        self.scheduler.fail(request, error)
        self._resolve(request.payload)

    def _resolve(self, sub: Submission) -> None:
        """The result of an ended request, once."""
        state = sub.state
        if state.error is not None:
            self._resolve_error(sub, state.error)
            return
        tracker = sub.tracker
        stopped = tracker.stopped
        tokens = tracker.tokens if stopped else list(state.tokens)
        if state.finish_reason == "length" and (incomplete := sub.answer.incomplete(len(tokens))):
            self._resolve_error(sub, incomplete)
            return
        result = GenerationResult(
            response=tracker.text if stopped else self.checkpoint.decode(tokens),
            num_input_tokens=sub.prompt_tokens, num_output_tokens=len(tokens), num_image_tokens=sub.image_tokens,
            finish_reason="stop" if stopped else state.finish_reason, token_ids=tokens,
            generation_ms=(time.perf_counter() - sub.started) * 1000.0,
            first_token_ms=(sub.first_token_s or 0.0) * 1000.0, choice_probs=sub.choice_probs,
            **(sub.answer.fields() if sub.answer is not None else {}),
        )
        if not sub.future.done():
            sub.future.set_result(result)

    def _resolve_error(self, sub: Submission, error: str) -> Submission:
        if not sub.future.done():
            sub.future.set_result(GenerationResult(error=error, num_input_tokens=sub.prompt_tokens,
                                                   num_image_tokens=sub.image_tokens))
        return sub

    def _snapshot(self) -> dict[str, float]:
        compiles = self._grammars.stats() if self._grammars is not None else NO_COMPILES
        return {**self.scheduler.stats(), **self.runner.stats(), **self.times.stats(), **self.mask_times.stats(),
                **compiles}
