"""The endpoint on the continuous engine, over real HTTP: tokens stream as they are made, new
requests join a running batch, a client that leaves frees its slot, one request that breaks the
engine fails alone, and images come only from where the operator allows.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults import poisoned_server
from tests.helpers import data_url, encode, noise_image, reference_chat, serve_image

pytestmark = pytest.mark.integration

LONG = 64
INTERVAL_MS = 100
POISON_WORDS = "zebra quartz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def question(image, text: str = "What is shown in this image?") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image) if not isinstance(image, str) else image}},
        {"type": "text", "text": text},
    ]}]


@pytest.fixture(scope="module")
def poison_ids(tiny_model) -> list[int]:
    """Token ids only the poisoned question carries (none of the ordinary prompts here do)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ordinary = set(tokenizer("[INST] What is shown in this image? [/INST]")["input_ids"])
    return sorted(set(tokenizer(POISON_WORDS)["input_ids"]) - ordinary - set(tokenizer.all_special_ids))


@pytest.fixture(scope="module")
def base(ray_local, tiny_model, poison_ids):
    """Three apps: the continuous endpoint (127.0.0.1 allowed as an image host), one whose engine
    breaks on the poison tokens (and streams at most one chunk per `INTERVAL_MS`), and one on the
    static scheduler."""
    from ray import serve

    from actors.serve_app import application
    from pipeline.serve_options import ServeOptions

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"model": tiny_model, "max_new_tokens": LONG, "gpus_per_replica": 0, "page_size": 16}
    live = ServeOptions.from_args({**common, "prepare_workers": 0, "allow_remote_images": True,
                                   "allow_image_hosts": "127.0.0.1"})
    serve.run(application(live), name="live", route_prefix="/")
    poisoned = ServeOptions.from_args({**common, "prepare_workers": 0, "stream_interval_ms": INTERVAL_MS})
    serve.run(application(poisoned, poisoned_server(poison_ids)), name="poisoned", route_prefix="/poisoned")
    static = ServeOptions.from_args({**common, "prepare_workers": 0, "scheduler": "static"})
    serve.run(application(static), name="static", route_prefix="/static")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def client(base: str, prefix: str = ""):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}{prefix}/v1", api_key="unused", max_retries=0, timeout=120)


def stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/v1/stats", timeout=30) as response:
        return json.loads(response.read())


def ask(base: str, messages: list[dict], max_tokens: int = LONG, prefix: str = ""):
    c = client(base, prefix)
    return c.chat.completions.create(model=c.models.list().data[0].id, messages=messages, max_tokens=max_tokens)


def timed_stream(base: str, messages: list[dict], max_tokens: int = LONG, prefix: str = ""):
    """(text, content-chunk arrival times, time the request was sent, time the stream ended)."""
    c = client(base, prefix)
    model = c.models.list().data[0].id
    sent = time.perf_counter()
    pieces, times = [], []
    for chunk in c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            times.append(time.perf_counter())
    return "".join(pieces), times, sent, time.perf_counter()


def test_the_stream_is_live_and_equals_the_plain_reply_and_the_reference(base, reference):
    image = noise_image(300, 80, seed=11)
    messages = question(image, "Describe the image in detail.")
    text, times, sent, ended = timed_stream(base, messages)
    plain = ask(base, messages)
    assert plain.usage.completion_tokens == LONG
    assert text == plain.choices[0].message.content == reference_chat(reference, messages, [image], LONG)
    assert len(times) >= 16
    assert times[0] - sent < (ended - sent) / 2


def test_a_stream_interval_gathers_the_pieces_and_changes_no_text(base):
    messages = question(noise_image(300, 80, seed=11), "Describe the image in detail.")
    text, times, sent, ended = timed_stream(base, messages, prefix="/poisoned")
    plain = ask(base, messages)
    assert text == plain.choices[0].message.content
    # Pieces leave the replica at least INTERVAL_MS apart: at most one per interval, plus the last.
    assert 1 <= len(times) <= (ended - sent) / (INTERVAL_MS / 1000) + 2


def test_a_new_request_gets_its_first_token_while_eight_others_generate(base):
    images = [noise_image(40 + 8 * i, 64, seed=30 + i) for i in range(8)]
    started = threading.Barrier(9)

    def long_one(image):
        c = client(base)
        stream = c.chat.completions.create(model=c.models.list().data[0].id, messages=question(image),
                                           max_tokens=400, stream=True)
        generating = False
        for chunk in stream:
            if not generating and chunk.choices and chunk.choices[0].delta.content:
                generating = True
                started.wait()
        return time.perf_counter()

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_one, image) for image in images]
        started.wait(timeout=120)  # all eight are generating
        assert stats(base)["running"] >= 8
        _, times, _, _ = timed_stream(base, question(noise_image(50, 50, seed=99)), max_tokens=4)
        finished = [f.result() for f in futures]
    assert times and times[0] < min(finished)


def test_a_5_mb_text_stalls_no_stream_and_no_health_check(base):
    """A 5 MB text took 14.6 s to be refused on the replica's event loop; meanwhile a live stream
    stalled 14.5 s between two chunks and /health took 13.6 s. Now it is refused by its length."""
    body = json.dumps({"messages": [{"role": "user", "content": "word " * 1_000_000}], "max_tokens": 8}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})

    def huge() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def health_s() -> float:
        start = time.perf_counter()
        urllib.request.urlopen(f"{base}/health", timeout=30).read()
        return time.perf_counter() - start

    with ThreadPoolExecutor(3) as pool:
        stream = pool.submit(timed_stream, base, question(noise_image(64, 64, seed=8)), 300)
        time.sleep(0.3)
        refused = pool.submit(huge)
        checks = [health_s() for _ in range(5)]
        status, reply = refused.result()
        _, times, _, _ = stream.result()
    assert (status, reply["error"]["code"]) == (400, "context_length_exceeded")
    assert max(checks) < 1.0, checks
    assert max(b - a for a, b in zip(times, times[1:])) < 1.0


def test_a_client_that_leaves_mid_stream_frees_its_slot(base):
    before = stats(base)
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps({"messages": question(noise_image(64, 64, seed=7)), "max_tokens": 900, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    response = urllib.request.urlopen(request, timeout=60)
    for _ in range(4):
        response.readline()
    assert stats(base)["running"] >= 1
    response.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (stats(base)["running"] > 0 or stats(base)["cancelled"] == before["cancelled"]):
        time.sleep(0.2)
    after = stats(base)
    assert after["running"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["generated_tokens"] - before["generated_tokens"] < 900


def test_one_request_that_breaks_the_engine_fails_alone(base, reference):
    images = [noise_image(40, 40 + 10 * i, seed=50 + i) for i in range(4)]
    barrier = threading.Barrier(5)

    def one(messages):
        barrier.wait()
        body = json.dumps({"messages": messages, "max_tokens": 12}).encode()
        request = urllib.request.Request(f"{base}/poisoned/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    asks = [question(image) for image in images] + [question(images[0], f"Explain {POISON_WORDS}.")]
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, asks))
    for (status, body), messages, image in zip(results[:4], asks, images):
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == reference_chat(reference, messages, [image], 12)
    status, body = results[4]
    assert status == 500 and body["error"]["code"] == "generation_failed"
    assert "poisoned step" not in body["error"]["message"], "the exception stays in the server's log"


@pytest.fixture(scope="module")
def image_host():
    """Loopback HTTP: /img.png is an image, /to?u=URL redirects to URL."""
    image = noise_image(60, 45, seed=12)
    server = serve_image(encode(image))
    yield server.server_port, image
    server.shutdown()


def test_remote_images_from_an_allowed_host_and_never_through_a_redirect_elsewhere(base, image_host, reference):
    port, image = image_host
    messages = question(f"http://127.0.0.1:{port}/img.png")
    assert ask(base, messages, 12).choices[0].message.content == reference_chat(reference, messages, [image], 12)
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as info:
        ask(base, question(f"http://127.0.0.1:{port}/to?u=http://localhost:{port}/img.png"), 12)
    assert info.value.body["code"] == "image_url_refused"


def test_the_static_scheduler_still_answers_and_streams(base, reference):
    image = noise_image(50, 30, seed=1)
    messages = question(image)
    plain = ask(base, messages, 12, prefix="/static").choices[0].message.content
    text, times, _, _ = timed_stream(base, messages, 12, prefix="/static")
    assert plain == text == reference_chat(reference, messages, [image], 12)
    assert stats(f"{base}/static")["scheduler"] == "static"


def test_the_static_scheduler_streams_constrained_answers_and_logprobs_as_the_continuous_one(base):
    """The static scheduler answers whole: its stream is the answer cut into per-token pieces, each
    with its tokens' log-probabilities, and it equals the continuous endpoint's answer."""
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["count"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}}
    messages = question(noise_image(36, 52, seed=13), "How many? Answer in JSON.")

    def reply(prefix: str, stream: bool = False):
        c = client(base, prefix)
        return c.chat.completions.create(model=c.models.list().data[0].id, messages=messages, max_tokens=40,
                                         response_format=fmt, logprobs=True, top_logprobs=2, stream=stream)

    def entries(content) -> list[tuple]:
        return [(bytes(e.bytes), round(e.logprob, 4), [bytes(t.bytes) for t in e.top_logprobs]) for e in content]

    static, continuous = reply("/static"), reply("")
    chunks = list(reply("/static", stream=True))
    answer = static.choices[0].message.content
    assert json.loads(answer)["count"] in range(100)
    assert answer == continuous.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    pieces = [c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(pieces) > 1  # the pieces carry their own tokens, not all of them at the end
    assert entries([e for piece in pieces for e in piece]) == entries(static.choices[0].logprobs.content)
    assert [b for b, _, _ in entries(static.choices[0].logprobs.content)] == [
        b for b, _, _ in entries(continuous.choices[0].logprobs.content)]
