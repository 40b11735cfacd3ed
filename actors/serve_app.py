"""The online endpoint: a Ray Serve deployment around the batch job's `Engine`, with an OpenAI API.

Each replica owns one `Engine`. A request is parsed and rendered on the replica's event loop;
its images are fetched, decoded and tiled in a pool of preparation processes beside the model
(`prepare_workers`), so image work never holds the interpreter that steps the model. Then:

- continuous scheduler (default): the request joins the engine's running batch at the next token
  step, and a streamed reply sends each piece of text as soon as it is final; a client that goes
  away cancels its request in the engine;
- static scheduler: `@serve.batch` gathers concurrent requests into one `Engine.generate_static`
  call, and a streamed reply is cut from the finished answer.

Admission is the replica's: past `max_ongoing_requests` running plus `max_queued_requests`
waiting, a request gets an OpenAI-shaped 503 at once. Serve's own queue in front is unbounded,
so no refusal ever comes as the proxy's plain text.

Use `build_app` from a Serve config file (`serve run actors/serve_config.yaml`), or
`python -m jobs.serve` on one machine.
"""

# No postponed annotations: FastAPI reads the route signatures at run time to find `Request`.
import asyncio
import dataclasses
import hmac
import json
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator, Callable
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
from actors.engine import Engine
from actors.image_policy import ImagePolicy, Refusal, prepare_image
from pipeline.config import ServeOptions
from pipeline.preprocess import PreparedImage
from pipeline.schemas import GenerationRequest, GenerationResult

# Serve's own logger: its lines land in the replica's log file, tagged with the request id.
log = logging.getLogger("ray.serve")

APP_NAME = "llava"
RETRY_AFTER_S = 1


@dataclass
class BatchStats:
    """Counts of the replica's requests by outcome, of the images it prepared, and of the static
    scheduler's batches, so operators and tests can see what happened."""

    requests: int = 0
    batches: int = 0
    max_batch_size: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    requests_by_status: dict[str, int] = dataclasses.field(default_factory=dict)
    images_prepared: int = 0

    def outcome(self, status: str) -> None:
        self.requests_by_status[status] = self.requests_by_status.get(status, 0) + 1

    def record(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.max_batch_size = max(self.max_batch_size, size)
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1


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
        self.engine = Engine(options.engine)
        self.policy = ImagePolicy(
            options.allow_remote_images, options.allow_s3_prefixes,
            tuple(h.lower() for h in options.allow_image_hosts), options.fetch_timeout_s,
        )
        self.stats = BatchStats()
        self._pool = preparation_pool(options.prepare_workers)
        self._warm_pool()
        # Admission: up to max_ongoing_requests run, up to max_queued_requests more wait here, and
        # the rest get an OpenAI-shaped 503 at once.
        self._running = asyncio.Semaphore(options.max_ongoing_requests)
        self._admitted = 0
        # Static scheduler: one thread runs the model, so the event loop keeps taking requests.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="generate")
        # Parsing and tokenising grow with the body: never on the event loop.
        self._text_pool = ThreadPoolExecutor(2, thread_name_prefix="text")
        self._generate_batch.set_max_batch_size(options.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000.0)
        self._requests = metrics.Counter("llava_requests", "Chat requests by HTTP status.", tag_keys=("status",))
        self._batch_size = metrics.Histogram(
            "llava_batch_size", "Requests per Engine.generate call (static scheduler).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._latency = metrics.Histogram(
            "llava_request_latency_ms", "End-to-end request latency in the replica.",
            boundaries=[10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
        )
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
        slowly, or no key, never holds a slot another client could use."""
        start = time.perf_counter()
        try:
            self._authorize(request)
            raw = await self._read_body(request)
        except api.ApiError as exc:
            return self._refuse(exc, start)
        except ClientDisconnect:
            self._requests.inc(tags={"status": "cancelled"})
            self.stats.outcome("cancelled")
            log.info("the client left while sending its request body")
            return Response(status_code=499)
        bound = admission_bound(self.options)
        if bound is not None and self._admitted >= bound:
            return self._refuse(api.ApiError(
                503, f"the server is busy: {self._admitted} requests running or queued; retry later",
                "server_error", "queue_full",
            ), start)
        self._admitted += 1
        handed_over = False
        try:
            await self._running.acquire()
            try:
                response = await self._chat_completions(raw, start)
                # A live stream keeps its slot until it ends (see `_stream`).
                handed_over = isinstance(response, StreamingResponse) and self.engine.loop is not None
                return response
            finally:
                if not handed_over:
                    self._running.release()
        finally:
            if not handed_over:
                self._admitted -= 1

    def _done_streaming(self) -> None:
        """A streamed reply ended (or its client left): its admission slot is free."""
        self._running.release()
        self._admitted -= 1

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
            if self.engine.loop is not None and chat.stream:
                return StreamingResponse(await self._started(self._stream(chat, generation, start)),
                                         media_type="text/event-stream")
            result = await (self._answer(generation) if self.engine.loop is not None
                            else self._generate_batch(generation))
            if result.error is not None:
                log.error("request %s failed in the engine: %s", chat.request_id, result.error)
                raise api.engine_error(result.error, chat.request_id)
        except api.ApiError as exc:
            return self._refuse(exc, start)
        except Exception:  # whatever goes wrong, this request fails alone and the replica lives
            request_id = chat.request_id if chat is not None else "-"
            log.exception("request %s failed", request_id)
            self._observe(500, start)
            return error_response(api.internal_error(request_id))
        self._log_done(chat, result, start)
        model = self.engine.model_name
        if not chat.stream:
            return JSONResponse(api.completion_body(chat, model, result))
        deltas = api.text_deltas(result.response, result.token_ids, self.engine.decode)
        return StreamingResponse(iter(api.sse_events(chat, model, result, deltas)), media_type="text/event-stream")

    # ---- the continuous engine ----------------------------------------------------------------

    @staticmethod
    async def _started(stream: AsyncIterator[str]) -> AsyncIterator[str]:
        """Run a stream to its first chunk now, so it owns its request and slot from here on
        (a started generator is always closed, even if no one reads it)."""
        first = await stream.__anext__()

        async def rest() -> AsyncIterator[str]:
            yield first
            async for event in stream:
                yield event

        return rest()

    async def _answer(self, generation: GenerationRequest) -> GenerationResult:
        """A whole answer from the running batch; a client that leaves cancels it."""
        submission = self.engine.submit(generation)
        try:
            return await asyncio.wrap_future(submission.future)
        finally:
            self.engine.loop.cancel(submission)  # a no-op once it is done

    async def _stream(self, chat: api.ChatRequest, generation: GenerationRequest, start: float) -> AsyncIterator[str]:
        """Chunks as the text becomes final; the last piece makes the stream equal the plain reply."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[str | None] = asyncio.Queue()

        def on_update(submission) -> None:  # on the engine's dispatcher thread
            loop.call_soon_threadsafe(updates.put_nowait, submission.tracker.stable())

        submission = self.engine.submit(generation, on_update)
        submission.future.add_done_callback(lambda _: loop.call_soon_threadsafe(updates.put_nowait, None))
        if submission.future.done() and submission.future.result().error is not None:
            # Refused at submission: an error reply instead of a stream (the caller frees the slot).
            error = submission.future.result().error
            log.error("request %s failed in the engine: %s", chat.request_id, error)
            raise api.engine_error(error, chat.request_id)
        chunks = api.Chunks(chat, self.engine.model_name)
        sent = ""
        try:
            yield chunks.role()
            interval = self.options.stream_interval_ms / 1000
            last = -interval
            finished = False
            while not finished:
                text = await updates.get()
                if text is not None and (wait := last + interval - loop.time()) > 0:
                    await asyncio.sleep(wait)
                # Updates that piled up meanwhile go out as one chunk.
                while text is not None and not updates.empty():
                    text = updates.get_nowait()
                finished = text is None
                if not finished and len(text) > len(sent) and text.startswith(sent):
                    yield chunks.content(text[len(sent):])
                    sent = text
                    last = loop.time()
            result = submission.future.result()
            if result.error is not None:
                log.error("request %s failed in the engine: %s", chat.request_id, result.error)
                error = api.engine_error(result.error, chat.request_id)
                self._observe(error.status, start)
                yield f"data: {json.dumps(error.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            if len(result.response) > len(sent) and result.response.startswith(sent):
                yield chunks.content(result.response[len(sent):])
            for event in chunks.end(result):
                yield event
            self._observe(200, start)
            self._log_done(chat, result, start)
        finally:
            self.engine.loop.cancel(submission)
            self._done_streaming()

    # ---- the static scheduler -----------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Concurrent requests, gathered by Serve, answered by one static `generate` call."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._model_thread, self.engine.generate_static, requests)
        self.stats.record(len(requests))
        self._batch_size.observe(len(requests))
        log.info("batch of %d request(s) in %.0f ms", len(requests), (time.perf_counter() - start) * 1000.0)
        return results

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
        ms = self._observe(200, start) if not chat.stream or self.engine.loop is None else None
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
