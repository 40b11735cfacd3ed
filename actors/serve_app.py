"""The engine replicas of the online endpoint: a Ray Serve deployment around the batch job's `Engine`.

Each replica owns one `Engine`. The HTTP ingress in front (actors/ingress.py) checks the key,
reads the body under its deadline and picks a replica by the image the request carries
(actors/routing.py); the replica admits the request, parses and tokenises its text in a thread
(actors/chat.py) and fetches, decodes and tiles its images in a pool of preparation processes
beside the model (`prepare_workers`), so neither holds the interpreter that steps the model and
no tile ever crosses the object store. The engine answers it whole or streamed
(actors/replies.py), the same way for both schedulers. The ingress gives up a call when its
client goes away, which cancels the request in the engine. A constrained answer's schema, regex
or grammar is compiled in a thread under a time limit before the engine sees it
(actors/structured.py).

`chat` is a stream of one head (status, headers, and the JSON body of a whole reply or a
refusal) followed, for a live stream, by its server-sent events. Admission is the replica's:
past `max_ongoing_requests` running plus `max_queued_requests` waiting, a request gets an
OpenAI-shaped 503 at once. The health check asks the engine itself (actors/health.py): a loop
that died or stalls with work fails it, so Serve replaces the replica, and its requests get a
503 `engine_restarting` meanwhile.

Use `build_app` from a Serve config file (`serve run actors/serve_config.yaml`), or
`python -m jobs.serve` on one machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve
from ray.serve import metrics
from ray.serve.config import RequestRouterConfig

from actors import chat as chat_text
from actors import openai_api as api
from actors import replies, structured
from actors.engine import Engine
from actors.health import EngineWatch
from actors.image_policy import ImagePolicy, Refusal, prepare_image
from actors.ingress import Head, LlavaIngress, head_of
from actors.metrics import EngineMetrics
from pipeline.preprocess import PreparedImage
from pipeline.schemas import GenerationRequest, GenerationResult
from pipeline.serve_options import ServeOptions

# Serve's own logger: its lines land in the replica's log file, tagged with the request id.
log = logging.getLogger("ray.serve")

APP_NAME = "llava"
ROUTER = "actors.routing:ImageAffinityRouter"


@dataclass
class ReplicaStats:
    """Counts of the replica's requests by outcome and of the images it prepared."""

    requests_by_status: dict[str, int] = dataclasses.field(default_factory=dict)
    images_prepared: int = 0

    def outcome(self, status: str) -> None:
        self.requests_by_status[status] = self.requests_by_status.get(status, 0) + 1


def admission_bound(options: ServeOptions) -> int | None:
    """Requests one replica holds at most (running + queued); None when the queue is unbounded."""
    if options.max_queued_requests < 0:
        return None
    return options.max_ongoing_requests + options.max_queued_requests


def preparation_pool(workers: int) -> Executor:
    """Processes for image work (threads when `workers` is 0); started fresh, never forked from
    a process that runs model threads."""
    if workers == 0:
        return ThreadPoolExecutor(4, thread_name_prefix="prepare")
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def engine_restarting(reason: str) -> api.ApiError:
    return api.ApiError(503, f"this replica's engine is being replaced ({reason}); retry shortly",
                        "server_error", "engine_restarting")


class LlavaNextServer:
    """One replica: the engine, admission, image preparation beside the model, and its health."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.engine = Engine(options.engine, options.max_batch_size, options.batch_wait_ms)
        self.policy = ImagePolicy(
            options.allow_remote_images, options.allow_s3_prefixes,
            tuple(h.lower() for h in options.allow_image_hosts), options.fetch_timeout_s,
        )
        self.stats = ReplicaStats()
        self.watch = EngineWatch(options.stall_s)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._pool = preparation_pool(options.prepare_workers)
        self._warm_pool()
        # Admission: up to max_ongoing_requests run, up to max_queued_requests more wait here, and
        # the rest get an OpenAI-shaped 503 at once.
        self._running = asyncio.Semaphore(options.max_ongoing_requests)
        self._admitted = 0
        self._in_engine = 0  # requests handed to the engine and not yet answered (the health check's "work")
        # Parsing and tokenising grow with the body: never on the event loop.
        self._text_pool = ThreadPoolExecutor(2, thread_name_prefix="text")
        # Constraints compile here (and log-probabilities find their tokens' bytes): never on the
        # event loop, and apart from the text work, so a slow compile delays no other body.
        self._answer_pool = ThreadPoolExecutor(2, thread_name_prefix="answer")
        self._requests = metrics.Counter("llava_requests", "Chat requests by HTTP status.", tag_keys=("status",))
        self._latency = metrics.Histogram(
            "llava_request_latency_ms", "End-to-end request latency in the replica.",
            boundaries=[10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
        )
        self.engine_metrics = EngineMetrics(self.engine).start()
        log.info("replica %s ready (%s scheduler): %s", self.replica_id, self.engine.scheduler,
                 json.dumps(options.describe(), default=str))

    def _warm_pool(self) -> None:
        """Start every preparation process now, not on the first requests."""
        probe = "data:image/png;base64,"
        futures = [self._pool.submit(prepare_image, probe, self.policy, self.engine.spec, self.options.limits)
                   for _ in range(max(1, self.options.prepare_workers))]
        for f in futures:
            f.result()

    # ---- what the ingress calls ---------------------------------------------------------------

    def check_health(self) -> None:
        """Serve's health check: fails while the engine's loop is dead or stalled with work."""
        if (reason := self._sick()) is not None:
            raise RuntimeError(reason)

    def health(self) -> str | None:
        """Why this replica cannot answer now, or None (the ingress's `/health`)."""
        return self._sick()

    def model_name(self) -> str:
        return self.engine.model_name

    def replica_stats(self) -> dict[str, Any]:
        """This replica's counts: the engine's loop (continuous) or its batches (static)."""
        return {"replica": self.replica_id, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()[:12],
                "scheduler": self.engine.scheduler, "admitted": self._admitted,
                **dataclasses.asdict(self.stats), **self.engine.stats()}

    async def chat(self, raw: bytes, image_key: str | None = None) -> AsyncIterator[Head | str]:
        """One chat request: a head, then a live stream's events. `image_key` is read by the router."""
        start = time.perf_counter()
        if (reason := self._sick()) is not None:
            yield self._refuse(engine_restarting(reason), start, quiet=True)
            return
        bound = admission_bound(self.options)
        if bound is not None and self._admitted >= bound:
            yield self._refuse(api.ApiError(503, f"the server is busy: {self._admitted} requests running or queued; "
                                            "retry later", "server_error", "queue_full"), start)
            return
        self._admitted += 1
        try:
            async with self._running:
                events = None
                try:
                    head, events = await self._start(raw, start)
                    yield head
                    if events is not None:
                        async for event in events:
                            yield event
                finally:
                    if events is not None:
                        await events.aclose()
        finally:
            self._admitted -= 1

    # ---- one request --------------------------------------------------------------------------

    def _sick(self) -> str | None:
        in_flight = self._in_engine if self.engine.streams else 0
        return self.watch.verdict(self.engine.alive(), self.engine.stats(), in_flight)

    async def _start(self, raw: bytes, start: float) -> tuple[Head, AsyncIterator[str] | None]:
        """The head of the reply and, for a live stream, the rest of its events."""
        chat = None
        try:
            chat, generation = await self._generation(raw)
            self._in_engine += 1
            if chat.stream:
                on_end = functools.partial(self._stream_ended, chat, start)
                try:
                    events = await replies.started(
                        replies.stream(self.engine, chat, generation, self.options.stream_interval_ms / 1000, on_end))
                except api.ApiError:  # refused before its stream began: `on_end` will not be called
                    self._in_engine -= 1
                    raise
                return head_of(200, stream=True), events
            try:
                result = await replies.answer(self.engine, generation)
            finally:
                self._in_engine -= 1
            if result.error is not None:
                if not self.engine.alive():
                    raise engine_restarting("its generation loop has stopped")
                log.error("request %s failed in the engine: %s", chat.request_id, result.error)
                raise api.engine_error(result.error, chat.request_id)
            logprobs = None
            if result.token_logprobs is not None:  # thousands of token lookups: not on the event loop
                logprobs = await asyncio.get_running_loop().run_in_executor(
                    self._answer_pool, structured.logprob_content, result.token_logprobs, self.engine.token_bytes)
        except api.ApiError as exc:
            return self._refuse(exc, start, quiet=exc.code == "engine_restarting"), None
        except Exception:  # whatever goes wrong, this request fails alone and the replica lives
            request_id = chat.request_id if chat is not None else "-"
            log.exception("request %s failed", request_id)
            self._observe(500, start)
            return head_of(500, api.internal_error(request_id).body()), None
        self._log_done(chat, result, start)
        return head_of(200, api.completion_body(chat, self.engine.model_name, result, logprobs)), None

    def _stream_ended(self, chat: api.ChatRequest, start: float, result: GenerationResult | None,
                      error: api.ApiError | None) -> None:
        """A streamed reply ended (or its client left)."""
        self._in_engine -= 1
        if error is not None:
            log.error("request %s failed in the engine: %s", chat.request_id, result.error)
            self._observe(error.status, start)
        elif result is None:
            self.stats.outcome("cancelled")
            log.info("request %s: the client left mid-stream", chat.request_id)
        else:
            self._observe(200, start)
            self._log_done(chat, result, start)

    def _refuse(self, exc: api.ApiError, start: float, quiet: bool = False) -> Head:
        """The refusal's head; `quiet` for refusals whose cause was logged once already."""
        self._observe(exc.status, start)
        if not quiet:
            log.info("request refused with %d: %s", exc.status, exc.message)
        return head_of(exc.status, exc.body())

    async def _generation(self, raw: bytes) -> tuple[api.ChatRequest, GenerationRequest]:
        """The engine request for a body: text work in a thread, images in the preparation pool
        (each distinct image once), lengths checked before anything is sent."""
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self._text_pool, chat_text.prepare_text, self.engine, raw, self.options.engine.max_new_tokens,
            self.options.max_images_per_request, (self.engine.model_name, self.options.model),
        )
        chat = prepared.chat
        if (why := await structured.answer_error(self.engine, chat.params, self._answer_pool)) is not None:
            raise api.bad_request(why, "invalid_response_format")
        distinct = list(dict.fromkeys(chat.image_urls))
        ready = dict(zip(distinct, await asyncio.gather(*(self._prepare(url) for url in distinct))))
        images = [ready[url] for url in chat.image_urls]
        generation = GenerationRequest(prepared.prompt, [i.tiles for i in images], [i.size for i in images], None,
                                       [i.digest for i in images], prompt_ids=prepared.prompt_ids)
        try:
            ids, _ = self.engine.tokenize(generation)
        except ValueError as exc:
            raise api.bad_request(str(exc), "context_length_exceeded") from None
        generation.params = chat_text.fit_lengths(chat, len(ids), self.engine.context, self.engine.kv_capacity_tokens())
        return chat, generation

    async def _prepare(self, url: str) -> PreparedImage:
        """One image through the preparation pool; a refusal becomes the matching API error."""
        self.stats.images_prepared += 1
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self._pool, prepare_image, url, self.policy, self.engine.spec, self.options.limits,
            self.options.fast_decode,
        )
        if isinstance(prepared, Refusal):
            raise api.ApiError(prepared.status, prepared.message, code=prepared.code)
        return prepared

    def _log_done(self, chat: api.ChatRequest, result: GenerationResult, start: float) -> None:
        ms = self._observe(200, start) if not chat.stream else None
        self.engine_metrics.request_done(result)
        log.info(
            "request %s: %d image(s), %d prompt + %d completion tokens, finish %s, first token %.0f ms, %s ms",
            chat.request_id, len(chat.image_urls), result.num_input_tokens, result.num_output_tokens,
            result.finish_reason, result.first_token_ms, f"{ms:.0f}" if ms is not None else "-",
        )

    def _observe(self, status: int, start: float) -> float:
        ms = (time.perf_counter() - start) * 1000.0
        self._requests.inc(tags={"status": str(status)})
        self.stats.outcome(str(status))
        self._latency.observe(ms)
        return ms


def gpus_for(options: ServeOptions) -> float:
    """The GPUs each replica asks for: as configured, else one when the cluster has any."""
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def application(options: ServeOptions, server_class: type | None = None) -> serve.Application:
    """The bound application for `serve.run`: the HTTP ingress in front of the engine replicas.

    Serve's queue in front of the replicas is unbounded and each replica takes more requests
    than its own bound, so every request reaches a replica and any refusal is the replica's
    OpenAI-shaped 503, never the proxy's plain text. `server_class` replaces the engine
    replica's class (the tests' fault injection).
    """
    bound = admission_bound(options)
    per_replica = 2 * bound + 64 if bound is not None else options.max_ongoing_requests
    health_period, health_timeout = options.health_periods()
    drain_loop, drain_timeout = options.drain_periods()
    autoscaling = options.autoscaling_config()
    engine = serve.deployment(server_class or LlavaNextServer).options(
        name="LlavaNextServer",
        num_replicas=None if autoscaling else options.replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=per_replica,
        max_queued_requests=-1,
        ray_actor_options={"num_gpus": gpus_for(options), "num_cpus": 1 + options.prepare_workers},
        health_check_period_s=health_period, health_check_timeout_s=health_timeout,
        graceful_shutdown_wait_loop_s=drain_loop, graceful_shutdown_timeout_s=drain_timeout,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER,
            request_router_kwargs={"overload": options.autoscaling_target, "by_image": options.routing == "image"},
        ),
    ).bind(options)
    if autoscaling:
        log.info("autoscaling %d-%d engine replicas on ongoing requests: target %d per replica, upscale after "
                 "%g s, downscale after %g s", options.replicas, options.max_replicas, options.autoscaling_target,
                 options.upscale_delay_s, options.downscale_delay_s)
    most = options.max_replicas or options.replicas
    return LlavaIngress.options(
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=per_replica * most,
        max_queued_requests=-1,
        ray_actor_options={"num_cpus": 0.1},
        graceful_shutdown_wait_loop_s=drain_loop, graceful_shutdown_timeout_s=drain_timeout,
    ).bind(engine, options)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files and `serve run actors.serve_app:build_app model=DIR`."""
    return application(ServeOptions.from_args(args))
