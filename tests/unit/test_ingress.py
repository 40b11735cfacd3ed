"""The HTTP front's pure parts: the routing key of a raw body, replies and merged counters."""

from __future__ import annotations

import json

from actors import openai_api as api
from actors.ingress import (
    error_response,
    head_of,
    merge_stats,
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
