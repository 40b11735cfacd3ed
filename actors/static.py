"""The static scheduler: whole batches through transformers' `generate`, the reference path.

A batch is tokenised with left padding and answered by one `generate` call; rows with different
sampling options go in different calls. Out of memory retries a batch in halves, down to single
rows, before a row fails. `submit` gathers requests that arrive within `batch_wait_ms` into
batches of up to `max_batch_size` on one thread, so a server drives both schedulers the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList

from actors.answer import Answer, ChoiceTokens, choice_probs, take
from actors.constraints import GrammarProcessor
from pipeline.config import SamplingParams
from pipeline.schemas import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


@dataclass(eq=False)
class StaticSubmission:
    """A request handed to the static batcher: its future, resolved when its batch is done."""

    request: GenerationRequest
    future: Future = field(default_factory=Future)
    on_update: Callable | None = None

    @property
    def done(self) -> bool:
        return self.future.done()


class StaticScheduler:
    """Batches of `generate` over one checkpoint; `generate` for a list, `submit` one at a time."""

    def __init__(self, checkpoint: Any, max_batch_size: int = 8, batch_wait_ms: float = 20.0):
        self.checkpoint = checkpoint
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.counters = {"requests": 0, "batches": 0, "max_batch_size": 0, "cancelled": 0}
        self._queue: queue.SimpleQueue[StaticSubmission | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, request: GenerationRequest, on_update: Callable | None = None) -> StaticSubmission:
        """Queue one request for the next batch (the listener is not called: answers come whole)."""
        sub = StaticSubmission(request)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._batches, name="llava-static", daemon=True)
                self._thread.start()
        self._queue.put(sub)
        return sub

    def cancel(self, sub: StaticSubmission) -> None:
        """A request not yet in a batch is dropped; one in a batch is answered anyway."""
        sub.future.cancel()  # only a future not yet running can be cancelled

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        self._queue.put(None)

    def _batches(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, deadline = [first], time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            live = [s for s in batch if s.future.set_running_or_notify_cancel()]
            self.counters["cancelled"] += len(batch) - len(live)
            if not live:
                continue
            self.counters["requests"] += len(live)
            self.counters["batches"] += 1
            self.counters["max_batch_size"] = max(self.counters["max_batch_size"], len(live))
            for sub, result in zip(live, self.generate([s.request for s in live])):
                sub.future.set_result(result)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Static batches of `generate`: every request gets exactly one result, failures as row errors."""
        results = [GenerationResult() for _ in requests]
        groups: dict[SamplingParams, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            try:
                ids, n_image = self.checkpoint.tokenize(req)
            except ValueError as exc:
                results[i].error = f"prompt: {exc}"
                continue
            results[i].num_input_tokens, results[i].num_image_tokens = len(ids), n_image
            groups[self.checkpoint.fit(len(ids), req.params or self.checkpoint.default_params())].append((i, ids))
        for params, members in groups.items():
            self._generate_split(params, members, requests, results)
        return results

    def _generate_split(
        self,
        params: SamplingParams,
        members: list[tuple[int, list[int]]],
        requests: list[GenerationRequest],
        results: list[GenerationResult],
    ) -> None:
        """Run one group; on out-of-memory retry it in halves, down to single rows."""
        try:
            finished, elapsed_ms = self._generate_group(params, members, requests)
        except torch.OutOfMemoryError as exc:
            if len(members) == 1:
                results[members[0][0]].error = f"generate: out of memory on a single row: {exc}"
                return
            log.warning("out of memory on a batch of %d; retrying in halves", len(members))
            if self.checkpoint.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(members) // 2
            self._generate_split(params, members[:half], requests, results)
            self._generate_split(params, members[half:], requests, results)
        except Exception as exc:  # a failing batch must not take its neighbours' batches down
            log.exception("generate failed on a batch of %d", len(members))
            for i, _ in members:
                results[i].error = f"generate: {type(exc).__name__}: {exc}"
        else:
            tokens, logits = finished
            for row, (i, ids) in enumerate(members):
                self._finish(results[i], tokens[row], logits[:, row], params, elapsed_ms)
                if params.choice_probs and results[i].error is None:
                    self._score_choices(results[i], requests[i], ids, logits[0, row], params)

    def _generate_group(
        self, params: SamplingParams, members: list[tuple[int, list[int]]], requests: list[GenerationRequest],
    ) -> tuple[tuple[list[list[int]], torch.Tensor], float]:
        """One left-padded `generate` call: each member's new tokens and the raw logits of every step
        `(steps, rows, vocab)`, and the call's wall time."""
        width = max(len(ids) for _, ids in members)
        input_ids = torch.full((len(members), width), self.checkpoint.pad_id, dtype=torch.long)
        attention = torch.zeros((len(members), width), dtype=torch.long)
        for row, (_, ids) in enumerate(members):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        inputs: dict[str, Any] = {
            "input_ids": input_ids.to(self.checkpoint.device),
            "attention_mask": attention.to(self.checkpoint.device),
        }
        tiles = [t for i, _ in members for t in requests[i].tiles]
        if tiles:
            sizes = [list(s) for i, _ in members for s in requests[i].image_sizes]
            inputs["pixel_values"] = self.checkpoint.pixel_batch(tiles)
            inputs["image_sizes"] = torch.tensor(sizes, dtype=torch.long, device=self.checkpoint.device)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "pad_token_id": self.checkpoint.pad_id,
            "do_sample": params.temperature > 0,
        }
        if params.temperature > 0:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if params.stop:
            gen_kwargs.update(stop_strings=list(params.stop), tokenizer=self.checkpoint.tokenizer)
        if params.constraint is not None:
            matchers = [self.checkpoint.grammars.matcher(params.constraint) for _ in members]
            gen_kwargs["logits_processor"] = LogitsProcessorList([GrammarProcessor(matchers, self.checkpoint.pad_id)])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.checkpoint.model.generate(**inputs, **gen_kwargs, output_logits=True,
                                                 return_dict_in_generate=True)
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        return (out.sequences[:, width:].tolist(), torch.stack(out.logits)), elapsed_ms

    def _finish(self, result: GenerationResult, tokens: list[int], logits: torch.Tensor, params: SamplingParams,
                ms: float) -> None:
        """Cut a row's tokens at its end of sequence, its complete grammar or its stop string, and
        fill in its result; the answer takes each token with the raw logits it came from."""
        answer = Answer.start(params, self.checkpoint.grammars if params.constraint else None)
        finish = "length"
        for k, tok in enumerate(tokens):
            take([answer], logits[k : k + 1], [tok], [k == 0])
            if tok in self.checkpoint.eos_ids or answer.stopped:
                tokens, finish = tokens[: k + 1], "stop"
                break
        if finish == "length" and (incomplete := answer.incomplete(len(tokens))):
            result.error = incomplete
            return
        result.logprob, result.token_logprobs = answer.logprob, answer.token_logprobs
        text = self.checkpoint.decode(tokens)
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        result.response = text
        result.token_ids = tokens
        result.num_output_tokens = len(tokens)
        result.finish_reason = finish
        result.generation_ms = ms

    def _score_choices(self, result: GenerationResult, request: GenerationRequest, ids: list[int],
                       first: torch.Tensor, params: SamplingParams) -> None:
        """Every choice's probability as the whole answer, by a forward over prompt and choice; a
        greedy answer becomes the most probable choice."""
        choices = ChoiceTokens.of(params.constraint.options, self.checkpoint.tokenizer, min(self.checkpoint.eos_ids))
        model, device = self.checkpoint.model, self.checkpoint.device
        rows = []
        for tokens in choices.ids:
            logp = [first.float().log_softmax(-1).unsqueeze(0)]
            if len(tokens) > 1:
                inputs: dict[str, Any] = {"input_ids": torch.tensor([ids + tokens[:-1]], device=device)}
                if request.tiles:
                    inputs["pixel_values"] = self.checkpoint.pixel_batch(request.tiles)
                    inputs["image_sizes"] = torch.tensor([list(s) for s in request.image_sizes], device=device)
                with torch.inference_mode():
                    logp.append(model(**inputs).logits[0, len(ids):].float().log_softmax(-1))
            rows.append(torch.cat(logp))
        result.choice_probs, best = choice_probs(choices, rows)
        if params.temperature == 0:
            answer = Answer(params, token_logprobs=[] if params.logprobs is not None else None)
            answer.settle(choices.ids[best], rows[best])
            result.token_ids, result.response = list(choices.ids[best]), choices.options[best]
            result.num_output_tokens, result.finish_reason = len(choices.ids[best]), "stop"
            result.logprob, result.token_logprobs = answer.logprob, answer.token_logprobs
