"""Streamed replies on the real engine: the role rides with the first text, keep-alive comments
fill silences, and the official `openai` client reads such a stream as if they were not there."""

from __future__ import annotations

import asyncio
import http.server
import json

import pytest

from actors import chat as chat_text
from actors import replies
from pipeline.schemas import GenerationRequest
from tests.helpers import loopback_server


def _request(engine, body: dict) -> tuple:
    """The chat request and engine request of an OpenAI body, as the replica builds them (no images)."""
    prepared = chat_text.prepare_text(engine, json.dumps(body).encode(), 12, None, (engine.model_name,))
    chat = prepared.chat
    generation = GenerationRequest(prepared.prompt, [], [], chat.params, [], prompt_ids=prepared.prompt_ids)
    return chat, generation


def _events(engine, body: dict, keepalive_s: float = replies.KEEPALIVE_S) -> list[str]:
    """Every event the replica would send for `body`, in order, and the ending's (result, error)."""
    chat, generation = _request(engine, body)
    ended = []

    async def run() -> list[str]:
        stream = replies.stream(engine, chat, generation, 0.0, lambda *end: ended.append(end), keepalive_s)
        return [event async for event in await replies.started(stream)]

    events = asyncio.run(run())
    assert len(ended) == 1 and ended[0][1] is None
    return events


def _data(events: list[str]) -> list[dict]:
    return [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]


def _first_role(chunks: list[dict]) -> dict:
    """The first chunk's only choice; it must be the only one that names the role."""
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    return chunks[0]["choices"][0]


def _serve_once(payload: bytes):
    """A loopback HTTP server that answers any POST with `payload` as an event stream."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    return loopback_server(Handler)


QUESTION = {"messages": [{"role": "user", "content": "Describe a red square."}], "stream": True}


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_the_first_event_is_the_role_with_the_first_text(request, scheduler):
    engine = request.getfixturevalue("engine" if scheduler == "continuous" else "static_engine")
    events = _events(engine, QUESTION)
    assert events[0].startswith("data: {") and events[-1] == "data: [DONE]\n\n"
    chunks = _data(events)
    first = _first_role(chunks)
    assert first["delta"]["content"] and first["finish_reason"] is None
    generation = _request(engine, QUESTION)[1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        engine.generate([generation])[0].response


def test_an_empty_answer_sends_the_role_with_its_finish(engine):
    # A stop string that the answer starts with: nothing is ever released as text.
    whole = engine.generate([_request(engine, QUESTION)[1]])[0].response
    body = {**QUESTION, "stop": [whole[:1]]}
    chunks = _data(_events(engine, body))
    first = _first_role(chunks)
    assert len(chunks) == 1 and first["delta"]["content"] == "" and first["finish_reason"] == "stop"


def test_keepalive_comments_fill_silences_and_the_openai_client_skips_them(engine):
    from openai import OpenAI

    plain = _events(engine, QUESTION)
    # An interval far below one model step: the wait for the first token is filled with comments.
    chatty = _events(engine, QUESTION, keepalive_s=0.0005)
    first_data = next(i for i, e in enumerate(chatty) if e.startswith("data: "))
    assert first_data > 0 and set(chatty[:first_data]) == {replies.KEEPALIVE}
    assert replies.KEEPALIVE not in plain

    server = _serve_once("".join(chatty).encode())
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k", max_retries=0)
        parsed = list(client.chat.completions.create(model="m", messages=QUESTION["messages"], stream=True))
    finally:
        server.shutdown()
    expected = _data(chatty)
    assert [c.model_dump(exclude_unset=True) for c in parsed] == expected
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == \
        "".join(c["choices"][0]["delta"].get("content", "") for c in _data(plain))
