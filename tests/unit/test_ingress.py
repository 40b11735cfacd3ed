"""The HTTP front's parts that need no Serve: reading a body, the routing key of a raw body,
replies and merged counters."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.exceptions import TaskCancelledError
from starlette.requests import ClientDisconnect, Request

from actors import openai_api as api
from actors.ingress import (
    error_response,
    head_of,
    merge_stats,
    read_body,
    replica_failed,
    routing_key,
)
from actors.routing import image_key


def test_the_routing_key_of_a_raw_body():
    parsed = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "s3://b/k"}}]}]}
    assert routing_key(json.dumps(parsed).encode()) == image_key(parsed) is not None
    assert routing_key(b"{not json") is None
    assert routing_key(b"[" * 100_000) is None  # too deep for the parser: the replica says why


def test_refusals_are_openai_shaped_and_503s_say_when_to_retry():
    busy = error_response(api.ApiError(503, "busy", "server_error", "queue_full"))
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert json.loads(busy.body)["error"]["code"] == "queue_full"
    assert "retry-after" not in error_response(api.bad_request("no")).headers
    failed = replica_failed("mid-stream").body()["error"]
    assert failed["code"] == "replica_failed" and failed["type"] == "server_error"
    assert head_of(200, stream=True) == {"status": 200, "body": None, "stream": True}


def test_stats_of_every_replica_are_summed_with_the_fronts_refusals():
    one = {"replica": "a", "pid": 11, "scheduler": "continuous", "finished": 3, "peak_running": 4,
           "requests_by_status": {"200": 3}, "image_encodings_run": 2}
    two = {"replica": "b", "pid": 12, "scheduler": "continuous", "finished": 5, "peak_running": 2,
           "requests_by_status": {"200": 4, "503": 1}, "image_encodings_run": 1}
    merged = merge_stats({"408": 2, "503": 1}, [one, two], receiving=3)
    assert (merged["finished"], merged["peak_running"], merged["image_encodings_run"]) == (8, 4, 3)
    assert merged["requests_by_status"] == {"200": 7, "503": 2, "408": 2}
    assert merged["replicas"] == [one, two] and "pid" not in merged and merged["scheduler"] == "continuous"
    assert merged["bodies_receiving"] == 3
    assert merge_stats({}, [])["requests_by_status"] == {} and merge_stats({}, [])["bodies_receiving"] == 0


def _request(messages: list, declared: int | None = None) -> Request:
    """A Starlette request whose ASGI `receive` hands out `messages` in turn (an exception is raised)."""
    headers = [(b"content-length", str(declared).encode())] if declared is not None else []
    pending = list(messages)

    async def receive() -> dict:
        item = pending.pop(0) if pending else {"type": "http.disconnect"}
        if isinstance(item, BaseException):
            raise item
        if item == "stall":
            await asyncio.sleep(60)
        return item

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def _body(chunk: bytes, more: bool) -> dict:
    return {"type": "http.request", "body": chunk, "more_body": more}


def test_a_body_is_read_whole_or_refused_with_its_reason():
    read = lambda request, limit=100, timeout_s=5.0: asyncio.run(read_body(request, limit, timeout_s))  # noqa: E731
    assert read(_request([_body(b'{"a":', True), _body(b" 1}", False)])) == b'{"a": 1}'
    with pytest.raises(api.ApiError) as declared:
        read(_request([], declared=101))
    with pytest.raises(api.ApiError) as streamed:
        read(_request([_body(b"x" * 60, True), _body(b"x" * 60, False)]))
    with pytest.raises(api.ApiError) as slow:
        read(_request([_body(b"x", True), "stall"]), timeout_s=0.2)
    assert (declared.value.status, streamed.value.status, slow.value.status) == (413, 413, 408)


def test_a_body_whose_sender_is_gone_is_a_disconnect_whatever_the_proxy_raises():
    """A client leaving mid-body reaches the replica as a disconnect message or, when Serve's proxy
    has already dropped the request, as Ray's own error from `receive()`: both are the client gone
    (counted as a cancel), never a 500."""
    read = lambda request: asyncio.run(read_body(request, 1000, 5.0))  # noqa: E731
    with pytest.raises(ClientDisconnect):
        read(_request([_body(b'{"messages": [', True), {"type": "http.disconnect"}]))
    with pytest.raises(ClientDisconnect) as raised:
        read(_request([_body(b'{"messages": [', True), TaskCancelledError()]))
    assert isinstance(raised.value.__cause__, TaskCancelledError)
