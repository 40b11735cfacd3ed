"""The online endpoint: a Ray Serve deployment around the batch job's `Engine`, with an OpenAI API.

Each replica owns one `Engine`. A request's key is checked, its body read under a deadline,
then it is admitted; its text is parsed and tokenised in a thread (actors/chat.py) and its images
fetched, decoded and tiled in a pool of preparation processes beside the model
(`prepare_workers`), so neither holds the interpreter that steps the model. The engine answers it
whole or streamed (actors/replies.py), the same way for both schedulers: the continuous one joins
it to the running batch at the next token step, the static one gathers concurrent requests into
batches of `generate`. A client that goes away cancels its request in the engine. A constrained
answer's schema, regex or grammar is compiled in a thread under a time limit before the engine
sees it (actors/structured.py).

Admission is the replica's: past `max_ongoing_requests` running plus `max_queued_requests`
waiting, a request gets an OpenAI-shaped 503 at once. Serve's own queue in front is unbounded,
so no refusal ever comes as the proxy's plain text.

Use `build_app` from a Serve config file (`serve run actors/serve_config.yaml`), or
`python -m jobs.serve` on one machine.
"""

# No postponed annotations: FastAPI reads the route signatures at run time to find `Request`.
import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from actors import chat as chat_text
from actors import openai_api as api
from actors import replies, structured
from actors.engine import Engine
from actors.image_policy import ImagePolicy, Refusal, prepare_image
from actors.metrics import EngineMetrics
from pipeline.config import ServeOptions
from pipeline.preprocess import PreparedImage
from pipeline.schemas import GenerationRequest, GenerationResult

# Serve's own logger: its lines land in the replica's log file, tagged with the request id.
log = logging.getLogger("ray.serve")

APP_NAME = "llava"
RETRY_AFTER_S = 1


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


def error_response(exc: api.ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def preparation_pool(workers: int) -> Executor:
    """Processes for image work (threads when `workers` is 0); started fresh, never forked from
    a process that runs model threads."""
    if workers == 0:
        return ThreadPoolExecutor(4, thread_name_prefix="prepare")
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


app = FastAPI(title="LLaVA-NeXT", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the OpenAI error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(api.ApiError(exc.status_code, str(exc.detail), "invalid_request_error", code))


@serve.deployment
@serve.ingress(app)
class LlavaNextServer:
    """One replica: the engine, the HTTP routes, admission, and image preparation beside the model."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.engine = Engine(options.engine, options.max_batch_size, options.batch_wait_ms)
        self.policy = ImagePolicy(
            options.allow_remote_images, options.allow_s3_prefixes,
            tuple(h.lower() for h in options.allow_image_hosts), options.fetch_timeout_s,
        )
        self.stats = ReplicaStats()
        self._pool = preparation_pool(options.prepare_workers)
        self._warm_pool()
        # Admission: up to max_ongoing_requests run, up to max_queued_requests more wait here, and
        # the rest get an OpenAI-shaped 503 at once.
        self._running = asyncio.Semaphore(options.max_ongoing_requests)
        self._admitted = 0
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
        log.info("replica ready (%s scheduler): %s", self.engine.scheduler, json.dumps(options.describe(), default=str))

    def _warm_pool(self) -> None:
        """Start every preparation process now, not on the first requests."""
        probe = "data:image/png;base64,"
        futures = [self._pool.submit(prepare_image, probe, self.policy, self.engine.spec, self.options.limits)
                   for _ in range(max(1, self.options.prepare_workers))]
        for f in futures:
            f.result()

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        model = {"id": self.engine.model_name, "object": "model", "created": 0, "owned_by": "llava-next-ray"}
        return self._json_if_authorized(request, lambda: {"object": "list", "data": [model]})

    @app.get("/v1/stats")
    async def replica_stats(self, request: Request) -> Response:
        """This replica's counts: the engine's loop (continuous) or its batches (static)."""
        def body() -> dict[str, Any]:
            return {"scheduler": self.engine.scheduler, "admitted": self._admitted,
                    **dataclasses.asdict(self.stats), **self.engine.stats()}

        return self._json_if_authorized(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """Key, then the whole body under one deadline, then admission: a client that sends its body
        slowly, or no key, never holds a slot another client could use (a full replica refuses at
        once, before the body)."""
        start = time.perf_counter()
        try:
            self._authorize(request)
            self._check_room()  # a full replica says so at once, without reading the body
            raw = await self._read_body(request)
        except api.ApiError as exc:
            return self._refuse(exc, start)
        except (ClientDisconnect, asyncio.CancelledError) as exc:
            # Serve's proxy either passes the disconnect on or cancels this call: either way, a cancel.
            self._requests.inc(tags={"status": "cancelled"})
            self.stats.outcome("cancelled")
            log.info("the client left while sending its request body")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Response(status_code=499)
        try:
            self._check_room()
        except api.ApiError as exc:
            return self._refuse(exc, start)
        self._admitted += 1
        handed_over = False
        try:
            await self._running.acquire()
            try:
                response = await self._chat_completions(raw, start)
                # A live stream keeps its slot until it ends (see `_stream_ended`).
                handed_over = isinstance(response, StreamingResponse)
                return response
            finally:
                if not handed_over:
                    self._running.release()
        finally:
            if not handed_over:
                self._admitted -= 1

    def _stream_ended(self, chat: api.ChatRequest, start: float, result: GenerationResult | None,
                      error: api.ApiError | None) -> None:
        """A streamed reply ended (or its client left): its admission slot is free."""
        self._running.release()
        self._admitted -= 1
        if error is not None:
            log.error("request %s failed in the engine: %s", chat.request_id, result.error)
            self._observe(error.status, start)
        elif result is None:
            self.stats.outcome("cancelled")
            log.info("request %s: the client left mid-stream", chat.request_id)
        else:
            self._observe(200, start)
            self._log_done(chat, result, start)

    def _check_room(self) -> None:
        """The OpenAI-shaped 503 when this replica already holds all the requests it takes."""
        bound = admission_bound(self.options)
        if bound is not None and self._admitted >= bound:
            raise api.ApiError(503, f"the server is busy: {self._admitted} requests running or queued; retry later",
                               "server_error", "queue_full")

    def _refuse(self, exc: api.ApiError, start: float) -> JSONResponse:
        self._observe(exc.status, start)
        log.info("request refused with %d: %s", exc.status, exc.message)
        return error_response(exc)

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

    async def _chat_completions(self, raw: bytes, start: float) -> Response:
        chat = None
        try:
            chat, generation = await self._generation(raw)
            if chat.stream:
                on_end = functools.partial(self._stream_ended, chat, start)
                events = replies.stream(self.engine, chat, generation, self.options.stream_interval_ms / 1000, on_end)
                return StreamingResponse(await replies.started(events), media_type="text/event-stream")
            result = await replies.answer(self.engine, generation)
            if result.error is not None:
                log.error("request %s failed in the engine: %s", chat.request_id, result.error)
                raise api.engine_error(result.error, chat.request_id)
            logprobs = None
            if result.token_logprobs is not None:  # thousands of token lookups: not on the event loop
                logprobs = await asyncio.get_running_loop().run_in_executor(
                    self._answer_pool, structured.logprob_content, result.token_logprobs, self.engine.token_bytes)
        except api.ApiError as exc:
            return self._refuse(exc, start)
        except Exception:  # whatever goes wrong, this request fails alone and the replica lives
            request_id = chat.request_id if chat is not None else "-"
            log.exception("request %s failed", request_id)
            self._observe(500, start)
            return error_response(api.internal_error(request_id))
        self._log_done(chat, result, start)
        return JSONResponse(api.completion_body(chat, self.engine.model_name, result, logprobs))

    # ---- helpers ------------------------------------------------------------------------------

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

    def _json_if_authorized(self, request: Request, body: Callable[[], Any]) -> Response:
        """A read-only route's JSON body, or the OpenAI-shaped 401 when the key is wrong."""
        try:
            self._authorize(request)
        except api.ApiError as exc:
            return error_response(exc)
        return JSONResponse(body())

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise api.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", "invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, within the body limit and `body_timeout_s` for all of it."""
        limit = self.options.max_body_bytes
        too_large = api.ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.options.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise api.ApiError(408, f"the request body did not arrive within {self.options.body_timeout_s:g} s",
                               code="body_timeout") from None
        return b"".join(chunks)

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


def application(options: ServeOptions) -> serve.Application:
    """The bound application for `serve.run`, with the replica options applied.

    Serve's queue in front of the replicas is unbounded and each replica takes more requests
    than its own bound, so every request reaches a replica and any refusal is the replica's
    OpenAI-shaped 503, never the proxy's plain text.
    """
    bound = admission_bound(options)
    return LlavaNextServer.options(
        num_replicas=options.replicas,
        max_ongoing_requests=2 * bound + 64 if bound is not None else options.max_ongoing_requests,
        max_queued_requests=-1,
        ray_actor_options={"num_gpus": gpus_for(options), "num_cpus": 1 + options.prepare_workers},
    ).bind(options)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files and `serve run actors.serve_app:build_app model=DIR`."""
    return application(ServeOptions.from_args(args))
