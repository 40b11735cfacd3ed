"""The endpoint's HTTP front: key, body, routing key, and a reply that survives its replica.

Serve's HTTP proxy hands a replica only the request's scope; the body is pulled later by the
replica, so no request router can see which image a request carries. This light deployment
(as in Ray Serve LLM) reads the body instead, under the body deadline, computes the request's
image key (actors/routing.py) and calls the engine replicas through a handle whose router
sends equal keys to the same replica. Images are still prepared on the engine replica: only the
body crosses, never the tiles.

The engine replica's `chat` streams a head (status and, for a whole reply or a refusal, its
JSON body) and then a live stream's events. A replica that dies before its head is retried
once (Serve's router has dropped it by then, so the retry lands elsewhere or on its
replacement); one that dies mid-stream ends the client's stream with an OpenAI-shaped error
event and `[DONE]`, never a hang. A key is checked before the body is read, and a client that
sends its body slowly holds no engine slot at all.
"""

# No postponed annotations: FastAPI reads the route signatures at run time to find `Request`.
import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from actors import openai_api as api
from actors.routing import image_key
from pipeline.serve_options import ServeOptions

log = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1
CALL_TIMEOUT_S = 10.0  # a read-only call to a replica (stats, health, model name)
# A replica's process that died or became unreachable, as a handle reports it.
REPLICA_GONE = (RayActorError,)
Head = dict[str, Any]


def head_of(status: int, body: Any = None, stream: bool = False) -> Head:
    """The first item of an engine replica's reply: its status and, unless streamed, its JSON body."""
    return {"status": status, "body": body, "stream": stream}


def error_response(exc: api.ApiError) -> JSONResponse:
    return json_reply(exc.status, exc.body())


def json_reply(status: int, body: Any) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def replica_failed(when: str) -> api.ApiError:
    return api.ApiError(503, f"the replica serving this request stopped {when}; retry", "server_error",
                        "replica_failed")


def merge_stats(front: dict[str, int], replicas: list[dict[str, Any]], receiving: int = 0) -> dict[str, Any]:
    """Every replica's counters summed (peaks as the largest), the ingress's refusals added to
    `requests_by_status`, the bodies it is receiving now, and each replica's own counters under
    `replicas`."""
    out: dict[str, Any] = {"scheduler": replicas[0]["scheduler"] if replicas else None, "replicas": replicas,
                           "bodies_receiving": receiving}
    for one in replicas:
        for name, value in one.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "pid":
                out[name] = max(out.get(name, 0), value) if name.startswith("peak_") else out.get(name, 0) + value
    statuses = dict(front)
    for one in replicas:
        for status, n in one.get("requests_by_status", {}).items():
            statuses[status] = statuses.get(status, 0) + n
    out["requests_by_status"] = statuses
    return out


def routing_key(raw: bytes) -> str | None:
    """The image key of a raw body (None for a body that does not parse: the replica says why)."""
    try:
        return image_key(json.loads(raw))
    except (ValueError, RecursionError):
        return None


app = FastAPI(title="LLaVA-NeXT", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the OpenAI error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(api.ApiError(exc.status_code, str(exc.detail), "invalid_request_error", code))


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, within `limit` bytes and `timeout_s` for all of it: 413 or 408 as an
    `ApiError`, `ClientDisconnect` when the client is gone."""
    too_large = api.ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise api.ApiError(408, f"the request body did not arrive within {timeout_s:g} s",
                           code="body_timeout") from None
    except (api.ApiError, ClientDisconnect):
        raise
    except Exception as exc:
        # Serve's replica reads the body from its proxy; when the proxy has dropped the request
        # (its client left) that read fails with Ray's own error (TaskCancelledError, seen in CI),
        # which the next `receive()` raises here in place of a disconnect message.
        log.info("reading the request body failed (%s): the client is gone", type(exc).__name__)
        raise ClientDisconnect() from exc
    return b"".join(chunks)


@serve.deployment
@serve.ingress(app)
class LlavaIngress:
    """The HTTP routes: key, body under a deadline, image key, then the engine replicas."""

    def __init__(self, engine: DeploymentHandle, options: ServeOptions):
        self.options = options
        self.engine = engine
        self.streams = engine.options(stream=True)
        self.requests_by_status: dict[str, int] = {}  # outcomes decided here (401, 408, 413, cancelled, ...)
        self.receiving = 0  # bodies arriving now: slow senders show here before they get their 408
        self._model: str | None = None
        self._parse_pool = ThreadPoolExecutor(2, thread_name_prefix="route-key")
        self._requests = metrics.Counter("llava_requests", "Chat requests by HTTP status.", tag_keys=("status",))

    # ---- routes -------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> Response:
        """Ok when an engine replica answers that its engine works, else 503 (`engine_restarting`)."""
        try:
            reason = await self._call(self.engine.health.remote())
        except (TimeoutError, *REPLICA_GONE):
            reason = "no engine replica answered"
        if reason is not None:
            return error_response(api.ApiError(503, reason, "server_error", "engine_restarting"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if (refused := self._unauthorized(request)) is not None:
            return refused
        if self._model is None:
            self._model = await self._call(self.engine.model_name.remote())
        model = {"id": self._model, "object": "model", "created": 0, "owned_by": "llava-next-ray"}
        return JSONResponse({"object": "list", "data": [model]})

    @app.get("/v1/stats")
    async def replica_stats(self, request: Request) -> Response:
        """Every engine replica's counts (summed, and each under `replicas`) and this front's refusals."""
        if (refused := self._unauthorized(request)) is not None:
            return refused
        return JSONResponse(merge_stats(self.requests_by_status, await self._each_replica_stats(), self.receiving))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """Key, then the whole body under one deadline, then an engine replica chosen by image."""
        try:
            self._authorize(request)
            raw = await self._read_body(request)
        except api.ApiError as exc:
            self._count(str(exc.status))
            log.info("request refused with %d: %s", exc.status, exc.message)
            return error_response(exc)
        except (ClientDisconnect, asyncio.CancelledError) as exc:
            # Serve's proxy either passes the disconnect on or cancels this call: either way, a cancel.
            self._count("cancelled")
            log.info("the client left while sending its request body")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return Response(status_code=499)
        key = await asyncio.get_running_loop().run_in_executor(self._parse_pool, routing_key, raw)
        try:
            head, reply = await self._forward(raw, key)
        except api.ApiError as exc:
            self._count(str(exc.status))
            return error_response(exc)
        if not head["stream"]:
            return json_reply(head["status"], head["body"])
        return StreamingResponse(self._relay(reply), media_type="text/event-stream")

    # ---- the engine replicas ------------------------------------------------------------------

    async def _forward(self, raw: bytes, key: str | None) -> tuple[Head, DeploymentResponseGenerator]:
        """The engine's head for this body, retried once on another replica if the first died first."""
        for attempt in (1, 2):
            reply = self.streams.chat.remote(raw, image_key=key)
            try:
                return await reply.__anext__(), reply
            except REPLICA_GONE as exc:
                reply.cancel()
                log.warning("an engine replica failed before answering (%s)%s", type(exc).__name__,
                            "; retrying on another" if attempt == 1 else "; giving up")
            except asyncio.CancelledError:
                reply.cancel()  # the client left: stop the request in the engine too
                raise
            except Exception:  # a failure of ours: this request fails alone, with one log entry
                reply.cancel()
                log.exception("the call to an engine replica failed")
                raise api.internal_error("-") from None
        raise replica_failed("before answering")

    async def _relay(self, reply: DeploymentResponseGenerator) -> AsyncIterator[str]:
        """A live stream's events; a replica that dies mid-stream ends it with an error event."""
        finished = False
        try:
            async for event in reply:
                yield event
            finished = True
        except REPLICA_GONE as exc:
            finished = True
            self._count("replica_failed")
            log.warning("an engine replica died mid-stream (%s); the stream ends with an error event",
                        type(exc).__name__)
            yield f"data: {json.dumps(replica_failed('mid-stream').body())}\n\n"
            yield "data: [DONE]\n\n"
        except Exception:  # a failure of ours mid-stream: the stream still ends the OpenAI way
            finished = True
            self._count("500")
            log.exception("a stream from an engine replica failed")
            yield f"data: {json.dumps(api.internal_error('-').body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client left: cancel the request in the engine
                reply.cancel()

    async def _each_replica_stats(self) -> list[dict[str, Any]]:
        """Each live engine replica's counters (Serve's broadcast; before the handle has seen its
        replicas, one plain call, which waits for them)."""
        try:
            replies = await self.engine.broadcast("replica_stats").results_async(
                timeout_s=CALL_TIMEOUT_S, return_exceptions=True)
        except TimeoutError:
            replies = []
        found = [s for s in replies if isinstance(s, dict)]
        return found or [await self._call(self.engine.replica_stats.remote())]

    async def _call(self, response: Any) -> Any:
        """A read-only call to a replica, given up (and cancelled) after CALL_TIMEOUT_S."""
        try:
            return await asyncio.wait_for(asyncio.shield(response), CALL_TIMEOUT_S)
        except TimeoutError:
            response.cancel()
            raise

    # ---- helpers ------------------------------------------------------------------------------

    def _count(self, status: str) -> None:
        self.requests_by_status[status] = self.requests_by_status.get(status, 0) + 1
        self._requests.inc(tags={"status": status})

    def _unauthorized(self, request: Request) -> Response | None:
        """The OpenAI-shaped 401 when the key is wrong, else None."""
        try:
            self._authorize(request)
        except api.ApiError as exc:
            return error_response(exc)
        return None

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise api.ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               "authentication_error", "invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        """The whole body (see `read_body`), counted in `receiving` while it arrives."""
        self.receiving += 1
        try:
            return await read_body(request, self.options.max_body_bytes, self.options.body_timeout_s)
        finally:
            self.receiving -= 1

