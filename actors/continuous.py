"""The continuous scheduler: requests join and leave the running batch at every token step.

A long-lived loop per engine, built on transformers' `ContinuousBatchingManager` (paged KV cache,
per-step scheduling, reuse of the KV blocks of shared prefixes). The manager takes token ids only,
so images go in as ids past the vocabulary that name rows of a `FeatureTable` (see features.py).

Three threads, each with one job:
- the submitting thread tokenises the request (`submit`; errors come back at once);
- the feeder encodes the images of waiting requests in batches (each distinct image once while
  it stays cached), then hands the request to the manager. A request whose image prefix another
  request is prefilling right now waits for that prefill, so its own prefill starts from the
  cached blocks instead of computing them again;
- the dispatcher reads the manager's outputs, cuts answers at stop strings, finishes requests
  and, if the loop dies, restarts it and re-runs the requests it held (see `_recover`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, FIFOScheduler

from actors import attention as packed_attention
from actors.features import Entry, FeatureEmbedding, FeatureTable
from actors.sampling import sampling_processors
from actors.text import TextTracker
from pipeline.config import SamplingParams
from pipeline.schemas import GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from actors.engine import Engine

log = logging.getLogger(__name__)

@dataclass
class Counters:
    """Work asked of the loop and work it did, for `_summary.json` and `/v1/stats`."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    prefill_tokens_submitted: int = 0
    prefill_tokens_computed: int = 0
    prefill_tokens_matched: int = 0
    generated_tokens: int = 0
    loop_restarts: int = 0
    peak_running: int = 0


def counting_scheduler(counters: Counters) -> str:
    """Register a FIFO scheduler that counts prefill tokens matched in and computed past the cache."""

    class CountingScheduler(FIFOScheduler):
        def _infer_request_tokens(self, state, request_ids_to_remove_from_waiting):
            before = state.position_offset if state.status == RequestStatus.PENDING else None
            tokens = super()._infer_request_tokens(state, request_ids_to_remove_from_waiting)
            if before is not None:
                counters.prefill_tokens_matched += state.position_offset - before
            return tokens

        def _schedule_request(self, state, request_tokens, token_budget, request_ids_to_remove_from_waiting):
            prefilling = state.status in (RequestStatus.PENDING, RequestStatus.PREFILLING)
            super()._schedule_request(state, request_tokens, token_budget, request_ids_to_remove_from_waiting)
            if prefilling:
                counters.prefill_tokens_computed += len(state.tokens_to_process)

    name = f"llava-counting-{id(counters)}"
    SCHEDULER_MAPPING[name] = CountingScheduler
    return name


@dataclass
class Submission:
    """One request in the loop: its ids, its images' table entries, its answer so far, its future."""

    key: str
    request: GenerationRequest
    params: SamplingParams
    prompt_ids: list[int]
    num_image_tokens: int
    tracker: TextTracker
    on_update: Callable[["Submission"], None] | None = None
    future: Future = field(default_factory=Future)
    entries: list[Entry] = field(default_factory=list)
    input_ids: list[int] | None = None
    gate: tuple | None = None
    attempts: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    cancelled: bool = False
    closed: bool = False  # set, under the loop's lock, by the one call that resolves the future

    @property
    def done(self) -> bool:
        return self.closed


class ContinuousLoop:
    """Per-token scheduling around one engine's model; thread-safe `submit`, `cancel`, `stats`."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        cfg = engine.cfg
        model = engine.model
        text = model.config.text_config
        self.vocab = int(text.vocab_size)
        embedding = model.get_input_embeddings()
        width = embedding.weight.shape[1]
        row_bytes = width * embedding.weight.element_size()
        capacity = max(1, int(cfg.image_cache_mb * 2**20) // row_bytes)
        self.table = FeatureTable(capacity, width, self.vocab, embedding.weight.dtype, engine.device)
        self.counters = Counters()
        self._scheduler_name = counting_scheduler(self.counters)
        self.max_batch_tokens = cfg.max_batch_tokens
        self.num_blocks = self._num_blocks()
        self._lock = threading.RLock()
        self._incoming: queue.Queue[Submission] = queue.Queue()
        self._waiting: deque[Submission] = deque()
        self._live: dict[str, Submission] = {}  # handed to the manager, not finished
        self._gates: dict[tuple, list[Submission]] = {}  # image prefix -> requests waiting for its prefill
        self._suspects: deque[Submission] = deque()  # requests a dead loop held, to re-run alone
        self._held: deque[Submission] = deque()  # ready requests waiting for the isolation to end
        self._isolating = False
        self._recovering = False  # a dead loop is being replaced: launch nothing onto it
        self._maintenance = False  # the loop is being replaced on purpose
        self._ids = itertools.count()
        self._closed = threading.Event()
        self._wake = threading.Event()
        model.set_input_embeddings(FeatureEmbedding(embedding, self.table.tensor, self.vocab))
        try:
            self.manager = self._start_manager()
        except Exception:
            model.set_input_embeddings(embedding)
            raise
        self._threads = [
            threading.Thread(target=self._feed, name="llava-feeder", daemon=True),
            # Not a daemon: when the main thread ends without `close`, this one stops the loop's
            # own (non-daemon) thread, so the interpreter can exit.
            threading.Thread(target=self._dispatch, name="llava-dispatcher"),
        ]
        for t in self._threads:
            t.start()
        log.info(
            "continuous scheduler: %d KV blocks of %d tokens, %s tokens per step, %d requests per step, "
            "image cache of %d rows (%.0f MB)",
            self.num_blocks or -1, cfg.page_size, self.max_batch_tokens or "auto", cfg.max_running_requests,
            capacity, capacity * row_bytes / 2**20,
        )

    # ---- set-up -------------------------------------------------------------------------------

    def _num_blocks(self) -> int | None:
        """KV blocks from --kv-cache-mb; without it, None on a GPU (transformers sizes the cache from
        free memory) and on CPU room for every running request at up to 1,024 tokens."""
        cfg, text = self.engine.cfg, self.engine.model.config.text_config
        if cfg.kv_cache_mb is None:
            if self.engine.device.type == "cuda":
                return None
            tokens = cfg.max_running_requests * min(self.engine.context, 1024)
            return max(4, -(-tokens // cfg.page_size))
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        per_block = 2 * text.num_hidden_layers * heads * head_dim * cfg.page_size * self.table.tensor.element_size()
        return max(4, int(cfg.kv_cache_mb * 2**20) // per_block)

    def _start_manager(self):
        cfg, engine = self.engine.cfg, self.engine
        generation = GenerationConfig(
            do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=sorted(engine.eos_ids),
            pad_token_id=engine.pad_id,
        )
        batch_tokens = self.max_batch_tokens
        if batch_tokens is None and engine.device.type != "cuda":
            batch_tokens = 1024
        cb = ContinuousBatchingConfig(
            page_size=cfg.page_size, num_blocks=self.num_blocks, max_batch_tokens=batch_tokens,
            max_requests_per_batch=cfg.max_running_requests, allow_block_sharing=True,
            scheduler_type=self._scheduler_name, auto_switch_to_flash=True,
            max_memory_percent=0.8 if engine.device.type == "cuda" else None,
        )
        if engine.model.config._attn_implementation == packed_attention.NAME:
            engine.model.set_attn_implementation(cfg.attn_implementation)  # what the loop checks it can serve
        manager = engine.model.init_continuous_batching(generation, cb)
        if engine.device.type == "cpu" and cfg.attn_implementation == "sdpa":
            engine.model.set_attn_implementation(packed_attention.NAME)  # see actors/attention.py
        # No CUDA graph can capture a step on CPU, so there the processors may skip idle work.
        manager.logit_processor = sampling_processors(branch_free=engine.device.type == "cuda")
        manager.start()
        return manager

    # ---- public -------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_update: Callable[[Submission], None] | None = None) -> Submission:
        """Queue one request; its future resolves to a `GenerationResult` (errors included)."""
        params = request.params or self.engine.default_params()
        tracker = TextTracker(self.engine.decode, params.stop)
        key = f"r{next(self._ids)}"
        if self._closed.is_set():
            sub = Submission(key, request, params, [], 0, tracker)
            self._fail(sub, "generate: the engine was shut down")
            return sub
        with self._lock:
            self.counters.requests += 1
        try:
            ids, n_image = self.engine.tokenize(request)
            params = self.engine.fit(len(ids), params)  # an answer never runs past the context
            if len(ids) + params.max_new_tokens > self.capacity_tokens:
                raise ValueError(
                    f"the request needs {len(ids) + params.max_new_tokens} tokens of KV cache but it holds "
                    f"{self.capacity_tokens} (raise --kv-cache-mb or lower max new tokens)"
                )
        except ValueError as exc:
            sub = Submission(key, request, params, [], 0, tracker)
            stage = "prompt" if not str(exc).startswith("the request needs") else "generate"
            self._fail(sub, f"{stage}: {exc}")
            return sub
        if params.temperature > 0 and params.seed is None:  # seeded now, so a re-run repeats its tokens
            params = dataclasses.replace(params, seed=random.randrange(2**31))
        sub = Submission(key, request, params, ids, n_image, tracker, on_update)
        self._incoming.put(sub)
        self._wake.set()
        return sub

    def cancel(self, sub: Submission) -> None:
        """Stop a request (a client went away): its slot and cache blocks are freed at the next step."""
        with self._lock:
            if sub.done:
                return
            sub.cancelled = True
            self.counters.cancelled += 1
            if self._live.pop(sub.key, None) is not None:
                self.manager.cancel_request(sub.key)
            self._finish(sub, "cancelled")
            self._next_isolated()

    @property
    def capacity_tokens(self) -> int:
        blocks = self.num_blocks
        if blocks is None and self.manager.batch_processor is not None:
            blocks = self.manager.batch_processor.cache.num_blocks
        return (blocks or 1 << 30) * self.engine.cfg.page_size

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counters.__dict__)
            gated = sum(len(v) for v in self._gates.values())
            out.update(running=len(self._live), waiting=self._incoming.qsize() + len(self._waiting) + gated
                       + len(self._suspects) + len(self._held), waiting_on_prefill=gated)
        out.update(self.table.stats())
        return out

    def close(self) -> None:
        """Stop the threads and the loop; requests still open end with an error."""
        self._closed.set()
        self._wake.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        self.manager.stop(block=True, timeout=30)
        with self._lock:
            open_subs = [*self._live.values(), *self._waiting, *self._suspects, *self._held,
                         *(f for group in self._gates.values() for f in group)]
        while not self._incoming.empty():
            open_subs.append(self._incoming.get_nowait())
        for sub in open_subs:
            self._fail(sub, "generate: the engine was shut down")

    # ---- feeder -------------------------------------------------------------------------------

    def _feed(self) -> None:
        while not self._closed.is_set():
            try:
                while True:
                    self._waiting.append(self._incoming.get_nowait())
            except queue.Empty:
                pass
            try:
                progressed = self._admit()
            except Exception:  # never let the feeder die: fail what it held and go on
                log.exception("feeder failed")
                for sub in list(self._waiting):
                    self._fail(sub, "generate: internal error while preparing the request")
                self._waiting.clear()
                progressed = False
            if not progressed:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def _admit(self) -> bool:
        """Acquire and encode images for waiting requests, then launch those that are ready."""
        if self.table.restart_pending:
            self._restart_table()
            if self.table.restart_pending:
                return False
        to_encode: list[tuple[Entry, torch.Tensor, tuple[int, int]]] = []
        ready: list[Submission] = []
        while self._waiting:
            sub = self._waiting[0]
            if sub.done:
                self._waiting.popleft()
                continue
            if not self._acquire_images(sub, to_encode):
                break
            self._waiting.popleft()
            ready.append(sub)
        if to_encode:
            self._encode(to_encode)
        for sub in ready:
            # Under the lock, so a cancel lands either before (and the request is dropped here)
            # or after its launch or gate registration, never in between.
            with self._lock:
                if sub.done:  # cancelled or failed meanwhile: let go of what was acquired since
                    self._release(sub)
                    continue
                failed = next((e.error for e in sub.entries if e.error is not None), None)
                if failed is not None:
                    self._fail(sub, f"generate: {failed}")
                    continue
                sub.input_ids = self._input_ids(sub)
                self._gate_or_launch(sub)
        return bool(ready)

    def _acquire_images(self, sub: Submission, to_encode: list) -> bool:
        """Reference every image of a request in the table; False when rows must be freed first."""
        req = sub.request
        digests = req.image_digests or [None] * len(req.tiles)
        sizes = [tuple(int(v) for v in size) for size in req.image_sizes]
        tokens = [self.engine.spec.num_image_tokens(size) for size in sizes]
        # One image too big for the table is the table's to refuse; several that fit only apart
        # would each wait for rows the others hold, for ever.
        if not sub.entries and len(tokens) > 1 and sum(tokens) > self.table.capacity:
            self._fail(sub, f"generate: the request's images need {sum(tokens)} image-cache rows together but "
                            f"the cache holds {self.table.capacity} (raise --image-cache-mb)")
            return True
        for k in range(len(sub.entries), len(req.tiles)):
            digest = digests[k] or self.engine.digest(req.tiles[k], sizes[k])
            try:
                got = self.table.acquire(digest, tokens[k])
            except ValueError as exc:
                self._fail(sub, f"generate: {exc}")
                return True
            if got is None:
                return False
            entry, new = got
            with self._lock:
                sub.entries.append(entry)
            if new:
                to_encode.append((entry, req.tiles[k], sizes[k]))
        return True

    def _encode(self, items: list[tuple[Entry, torch.Tensor, tuple[int, int]]]) -> None:
        """Run the vision tower and projector on the new images, a bounded number of tiles at a time."""
        limit = self.engine.cfg.vision_batch_tiles
        chunk: list = []
        tiles = 0
        for item in items + [None]:
            if item is not None and (not chunk or tiles + item[1].shape[0] <= limit):
                chunk.append(item)
                tiles += item[1].shape[0]
                continue
            try:
                with self._model_to_myself():
                    features = self.engine.encode_images([c[1] for c in chunk], [c[2] for c in chunk])
                for (entry, _, _), f in zip(chunk, features):
                    self.table.publish(entry, f)
            except Exception as exc:
                log.exception("image encoding failed for %d image(s)", len(chunk))
                for entry, _, _ in chunk:
                    self.table.fail(entry, f"image encoding failed: {type(exc).__name__}: {exc}")
            chunk, tiles = ([item], item[1].shape[0]) if item is not None else ([], 0)

    @contextlib.contextmanager
    def _model_to_myself(self):
        """Hold the step loop between two steps while the vision tower runs: the two must not run
        model code at the same time (seen on CPU: concurrent steps corrupted the image features)."""
        manager = self.manager
        if manager is None or not manager.is_running():
            yield
            return
        try:
            pause = manager.pause()
            pause.__enter__()
        except RuntimeError:  # the loop stopped meanwhile: nothing runs beside us
            yield
            return
        try:
            yield
        finally:
            pause.__exit__(None, None, None)

    def _input_ids(self, sub: Submission) -> list[int]:
        """The prompt with each image's placeholder run replaced by the ids of its table rows."""
        image_ids = iter(i for e in sub.entries for i in e.ids)
        token = self.engine.image_token_id
        return [next(image_ids) if t == token else t for t in sub.prompt_ids]

    def _gate_or_launch(self, sub: Submission) -> None:
        """Launch now, or wait for a running request with the same image prefix to finish its prefill."""
        ids = sub.input_ids
        end = max((i + 1 for i, t in enumerate(ids) if t >= self.vocab), default=0)
        if end >= self.engine.cfg.page_size:
            sub.gate = tuple(ids[:end])
        with self._lock:
            if self._isolating:
                self._held.append(sub)
                return
            if sub.gate is not None:
                if sub.gate in self._gates:
                    self._gates[sub.gate].append(sub)
                    return
                self._gates[sub.gate] = []
        self._launch(sub)

    def _open_gate(self, sub: Submission) -> None:
        """The request's prefix is in the cache (or it ended): let the requests waiting on it go."""
        with self._lock:
            followers = self._gates.pop(sub.gate, []) if sub.gate is not None else []
            sub.gate = None
            for follower in followers:
                follower.gate = None
                (self._held.append if self._isolating else self._launch)(follower)

    def _launch(self, sub: Submission) -> None:
        with self._lock:
            if sub.done:
                return
            self._live[sub.key] = sub
            self.counters.peak_running = max(self.counters.peak_running, len(self._live))
            sub.attempts += 1
            self.counters.prefill_tokens_submitted += len(sub.input_ids)
            p = sub.params
            # Outputs at every step only for who needs them: a listener, stop strings, or requests
            # waiting on this one's prefill; the rest hear once, when done.
            streaming = sub.on_update is not None or bool(p.stop) or sub.gate is not None
            self.manager.add_request(
                sub.input_ids, request_id=sub.key, max_new_tokens=p.max_new_tokens, streaming=streaming,
                temperature=float(p.temperature), top_p=float(p.top_p), top_k=int(p.top_k), seed=int(p.seed or 0),
            )

    # ---- dispatcher ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._closed.is_set():
            if not threading.main_thread().is_alive():
                self.close()
                return
            manager = self.manager
            out = manager.get_result(timeout=0.05)
            if out is None:
                with self._lock:
                    dead = manager is self.manager and not self._maintenance and not manager.is_running()
                if dead and not self._closed.is_set():
                    try:
                        self._recover(manager)
                    except Exception:  # the dispatcher must outlive anything a recovery meets
                        log.exception("restarting the generation loop failed; trying again")
                        time.sleep(1.0)
                continue
            try:
                self._on_output(manager, out)
            except Exception:
                log.exception("dispatching an output failed")

    def _on_output(self, manager, out) -> None:
        with self._lock:
            sub = self._live.get(out.request_id)
        if sub is None or sub.done or manager is not self.manager:
            return
        if out.status == RequestStatus.FAILED:
            if manager.background_thread_status.can_accept_new_requests() is None:
                self._drop_live(sub)
                self._fail(sub, f"generate: {out.error}")
            return  # the loop is dying: `_recover` runs the request again
        if sub.first_token_s is None and out.generated_tokens:
            sub.first_token_s = time.perf_counter() - sub.started
            self._open_gate(sub)
        stopped = sub.tracker.update(out.generated_tokens)
        if stopped or out.is_finished():
            if stopped and not out.is_finished():
                manager.cancel_request(sub.key)
            self._drop_live(sub)
            self._finish(sub, "stop" if stopped or self._ends_with_eos(sub.tracker.tokens) else "length")
        elif sub.on_update is not None:
            sub.on_update(sub)

    def _ends_with_eos(self, tokens: list[int]) -> bool:
        return bool(tokens) and tokens[-1] in self.engine.eos_ids

    def _drop_live(self, sub: Submission) -> None:
        with self._lock:
            self._live.pop(sub.key, None)
            if sub.gate is not None:
                self._open_gate(sub)
            self._next_isolated()

    def _recover(self, dead) -> None:
        """The loop died (an exception in a model step fails every request it held).

        It is restarted. After out-of-memory the step is halved and every request runs again
        (until the step is one page); otherwise the requests it held run again one at a time, so
        the one that kills the loop fails alone and the others are answered. Greedy and seeded requests regenerate the same
        tokens, so a streamed answer simply continues.
        """
        dead.join(time.perf_counter(), timeout=30)
        error = dead.background_thread_status.fatal_error
        oom = isinstance(error, torch.OutOfMemoryError)
        floor = self.engine.cfg.page_size
        with self._lock:
            self._recovering = True
            suspects = sorted(self._live.values(), key=lambda s: int(s.key[1:]))
            self._live.clear()
            waiting = [f for group in self._gates.values() for f in group]
            self._gates.clear()
            if suspects:
                self.counters.loop_restarts += 1
            current = int(self.max_batch_tokens or dead.continuous_batching_config.max_batch_tokens)
            shrink = oom and bool(suspects) and current > floor
            if shrink:
                self.max_batch_tokens = max(floor, current // 2)
            # Queued before the new loop starts, so a failed start loses nobody.
            for sub in suspects:
                sub.gate = None
                if len(suspects) == 1 and not shrink:
                    self._fail(sub, f"generate: {type(error).__name__}: {error}")
                else:
                    (self._held if shrink else self._suspects).append(sub)
            self._held.extend(waiting)
            self._isolating = True
        log.error("the generation loop died (%s: %s) holding %d request(s); restarting it",
                  type(error).__name__, error, len(suspects))
        if shrink:
            log.warning("out of memory: %d tokens per step from now on", self.max_batch_tokens)
        dead.stop(block=True, timeout=30)
        if oom and self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self.manager = self._start_manager()
        finally:
            with self._lock:
                self._recovering = False
        self._next_isolated()

    def _next_isolated(self) -> None:
        """While isolating: run the next suspect alone; with none left, back to normal traffic."""
        with self._lock:
            if not self._isolating or self._live or self._recovering:
                return
            while self._suspects:
                sub = self._suspects.popleft()
                if not sub.done:
                    self._launch(sub)
                    return
            self._isolating = False
            held, self._held = list(self._held), deque()
        for sub in held:
            if not sub.done:
                self._gate_or_launch(sub)

    def _restart_table(self) -> None:
        """Row epochs ran out: once nothing uses the table, restart it and the loop's KV cache."""
        for sub in self._waiting:  # partly acquired requests let go, so the table can empty
            self._release(sub)
        if self.table.referenced or self._live:
            return
        self.restart_loop(self.table.restart)
        log.info("image table restarted (row epochs ran out); cached KV blocks dropped with it")

    def restart_loop(self, between: Callable[[], None] | None = None) -> None:
        """Replace the loop by a fresh one (an empty KV cache); only while no request runs in it."""
        with self._lock:
            if self._live:
                raise RuntimeError("the loop can only be restarted while no request runs in it")
            self._maintenance = True
            try:
                self.manager.stop(block=True, timeout=30)
                if between is not None:
                    between()
                self.manager = self._start_manager()
            finally:
                self._maintenance = False

    # ---- endings ------------------------------------------------------------------------------

    def _close(self, sub: Submission) -> bool:
        """Claim the right to resolve a request's future: True for exactly one caller."""
        with self._lock:
            if sub.closed:
                return False
            sub.closed = True
            return True

    def _finish(self, sub: Submission, reason: str) -> None:
        """Fill in the result, release the images, resolve the future (once)."""
        if not self._close(sub):
            return
        result = GenerationResult(
            num_input_tokens=len(sub.prompt_ids), num_image_tokens=sub.num_image_tokens,
            generation_ms=(time.perf_counter() - sub.started) * 1000.0,
        )
        tokens = sub.tracker.tokens
        result.response = sub.tracker.text if sub.tracker.stopped else self.engine.decode(tokens)
        result.token_ids, result.num_output_tokens, result.finish_reason = list(tokens), len(tokens), reason
        result.first_token_ms = (sub.first_token_s or 0.0) * 1000.0
        with self._lock:
            self.counters.generated_tokens += len(tokens)
            if reason != "cancelled":
                self.counters.finished += 1
        self._release(sub)
        sub.future.set_result(result)

    def _fail(self, sub: Submission, error: str) -> None:
        if not self._close(sub):
            return
        with self._lock:
            self.counters.failed += 1
        self._release(sub)
        sub.future.set_result(GenerationResult(
            error=error, num_input_tokens=len(sub.prompt_ids), num_image_tokens=sub.num_image_tokens,
        ))

    def _release(self, sub: Submission) -> None:
        """Let go of a request's images; a gate leader lets its followers go, a follower leaves its group."""
        with self._lock:
            entries, sub.entries = sub.entries, []
            group = self._gates.get(sub.gate) if sub.gate is not None else None
            if group is not None and any(f is sub for f in group):
                group[:] = [f for f in group if f is not sub]
                sub.gate = None
        for entry in entries:
            self.table.release(entry)
        if sub.gate is not None:
            self._open_gate(sub)
        self._wake.set()
