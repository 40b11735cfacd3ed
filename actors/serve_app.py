"""The online endpoint: a Ray Serve deployment around the batch job's `Engine`, with an OpenAI API.

Each replica owns one `Engine`. Requests are parsed, rendered with `Engine.render` and their
images decoded and tiled (`pipeline.preprocess.prepare`) in the replica, off the event loop;
`@serve.batch` then gathers concurrent requests into one `Engine.generate` call. Streaming
replies are cut from the finished answer, so a streamed and a plain reply are always equal.

Use `build_app` from a Serve config file (`serve run actors/serve_config.yaml`), or
`python -m jobs.serve` on one machine.
"""

# No postponed annotations: FastAPI reads the route signatures at run time to find `Request`.
import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException

from actors import openai_api as api
from actors.engine import Engine
from pipeline.config import ImageLimits, ServeOptions
from pipeline.preprocess import ImageError, PreparedImage, prepare
from pipeline.schemas import GenerationRequest, GenerationResult

# Serve's own logger: its lines land in the replica's log file, tagged with the request id.
log = logging.getLogger("ray.serve")

APP_NAME = "llava"


@dataclass
class BatchStats:
    """Counts of the batches a replica ran, so clients and tests can see batching happen."""

    requests: int = 0
    batches: int = 0
    max_batch_size: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)

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
    return JSONResponse(exc.body(), status_code=exc.status)


app = FastAPI(title="LLaVA-NeXT", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the OpenAI error shape too."""
    return error_response(api.ApiError(exc.status_code, str(exc.detail), "invalid_request_error", "not_found"))


@serve.deployment
@serve.ingress(app)
class LlavaNextServer:
    """One replica: the engine, the HTTP routes, and the batcher in front of `Engine.generate`."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.engine = Engine(options.engine_config())
        self.limits = ImageLimits(options.max_image_bytes, options.max_image_pixels)
        self.stats = BatchStats()
        # Admission: up to max_ongoing_requests run, up to max_queued_requests more wait here, and
        # the rest get an OpenAI-shaped 503 at once (Serve's proxy queue is only a backstop).
        self._running = asyncio.Semaphore(options.max_ongoing_requests)
        self._admitted = 0
        # One thread runs the model, so the event loop keeps parsing and preparing new requests.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._generate_batch.set_max_batch_size(options.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000.0)
        self._requests = metrics.Counter(
            "llava_requests", "Chat requests by HTTP status.", tag_keys=("status",)
        )
        self._batch_size = metrics.Histogram(
            "llava_batch_size", "Requests per Engine.generate call.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self._latency = metrics.Histogram(
            "llava_request_latency_ms", "End-to-end request latency in the replica.",
            boundaries=[10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000],
        )
        log.info("replica ready: %s", json.dumps(options.describe()))

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        model = {"id": self.engine.model_name, "object": "model", "created": 0, "owned_by": "llava-next-ray"}
        return self._json_if_authorized(request, lambda: {"object": "list", "data": [model]})

    @app.get("/v1/stats")
    async def batch_stats(self, request: Request) -> Response:
        """This replica's batch counts (each replica answers for itself)."""
        return self._json_if_authorized(request, lambda: dataclasses.asdict(self.stats))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        bound = admission_bound(self.options)
        if bound is not None and self._admitted >= bound:
            self._requests.inc(tags={"status": "503"})
            return error_response(api.ApiError(
                503, f"the server is busy: {self._admitted} requests running or queued; retry later",
                "server_error", "queue_full",
            ))
        self._admitted += 1
        try:
            async with self._running:
                return await self._chat_completions(request)
        finally:
            self._admitted -= 1

    async def _chat_completions(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            self._authorize(request)
            chat = api.parse_chat_request(await self._read_json(request), self.options.max_new_tokens)
            if chat.model not in (None, self.engine.model_name, self.options.model):
                raise api.ApiError(
                    404, f"model {chat.model!r} is not served here; use {self.engine.model_name!r}",
                    code="model_not_found",
                )
            prompt = self._render(chat.messages)
            images = await asyncio.gather(*(asyncio.to_thread(self._prepare, url) for url in chat.image_urls))
            result = await self._generate_batch(
                GenerationRequest(prompt, [i.tiles for i in images], [i.size for i in images], chat.params)
            )
            if result.error is not None:
                raise api.engine_error(result.error)
        except api.ApiError as exc:
            self._observe(exc.status, start)
            log.info("request refused with %d: %s", exc.status, exc.message)
            return error_response(exc)
        except Exception as exc:  # whatever goes wrong, this request fails alone and the replica lives
            self._observe(500, start)
            log.exception("request failed")
            return error_response(api.ApiError(500, f"{type(exc).__name__}: {exc}", "server_error", "internal_error"))
        ms = self._observe(200, start)
        log.info(
            "request %s: %d image(s), %d prompt + %d completion tokens, finish %s, %.0f ms",
            chat.request_id, len(images), result.num_input_tokens, result.num_output_tokens, result.finish_reason, ms,
        )
        model = self.engine.model_name
        if not chat.stream:
            return JSONResponse(api.completion_body(chat, model, result))
        deltas = api.text_deltas(result.response, result.token_ids, self._decode)
        return StreamingResponse(iter(api.sse_events(chat, model, result, deltas)), media_type="text/event-stream")

    # ---- batching -----------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Concurrent requests, gathered by Serve, answered by one `Engine.generate` call."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._model_thread, self.engine.generate, requests)
        self.stats.record(len(requests))
        self._batch_size.observe(len(requests))
        log.info("batch of %d request(s) in %.0f ms", len(requests), (time.perf_counter() - start) * 1000.0)
        return results

    # ---- helpers ------------------------------------------------------------------------------

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

    async def _read_json(self, request: Request) -> Any:
        """The body as JSON, read no further than the body limit."""
        limit = self.options.max_body_bytes
        too_large = api.ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as exc:
            raise api.bad_request(f"the body is not valid JSON: {exc}", "invalid_json") from None

    def _render(self, messages: list[dict]) -> str:
        """The prompt for a conversation; any failure to render depends on the request alone, so is a 400."""
        try:
            return self.engine.render(messages)
        except Exception as exc:
            raise api.bad_request(f"cannot build the prompt: {exc}", "invalid_prompt") from None

    def _prepare(self, url: str) -> PreparedImage:
        data = api.fetch_image(url, self.limits.max_bytes, self.options.allow_remote_images)
        try:
            return prepare(data, self.engine.spec, self.limits)
        except ImageError as exc:
            if "over the limit" in str(exc):
                raise api.ApiError(413, str(exc), code="image_too_large") from None
            raise api.bad_request(f"cannot decode the image: {exc}", "invalid_image") from None

    def _decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _observe(self, status: int, start: float) -> float:
        ms = (time.perf_counter() - start) * 1000.0
        self._requests.inc(tags={"status": str(status)})
        self._latency.observe(ms)
        return ms


def gpus_for(options: ServeOptions) -> float:
    """The GPUs each replica asks for: as configured, else one when the cluster has any."""
    if options.gpus_per_replica is not None:
        return options.gpus_per_replica
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def application(options: ServeOptions) -> serve.Application:
    """The bound application for `serve.run`, with the replica options applied.

    Serve lets twice the replica's bound through, so the overflow reaches the replica and is
    refused there with an OpenAI-shaped 503 instead of waiting in the proxy.
    """
    bound = admission_bound(options)
    return LlavaNextServer.options(
        num_replicas=options.replicas,
        max_ongoing_requests=2 * bound if bound is not None else options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        ray_actor_options={"num_gpus": gpus_for(options)},
    ).bind(options)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files and `serve run actors.serve_app:build_app model=DIR`."""
    return application(ServeOptions.from_args(args))
