"""The Serve endpoint over real HTTP on loopback, driven by the official `openai` client.

Answers are compared with the plain transformers reference (processor + `generate`, greedy) on
the same messages, so batching, streaming and image handling are checked for what a user sees.
Constrained answers and log-probabilities are compared with the engine's own, called directly
on the same messages (tests/unit/test_constraints.py holds those to the reference).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import urllib.error
import urllib.request

import pytest

from tests.helpers import data_url, encode, noise_image, openai_to_internal, reference_chat

pytestmark = pytest.mark.integration

API_KEY = "test-key"
MAX_TOKENS = 12
CONCURRENT = 16


def http(url: str, body: bytes | None = None, key: str | None = API_KEY) -> tuple[int, str]:
    """Status and text of a GET (or a POST when there is a body), errors included."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, data=body, headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def expected(reference):
    """`expected(messages, images)`: the transformers answer for OpenAI messages and PIL images."""
    return lambda messages, images: reference_chat(reference, messages, images, MAX_TOKENS)


@pytest.fixture(scope="module")
def server(ray_local, tiny_model):
    """The application on a free loopback port, small limits so the 413 cases stay cheap.

    Remote images are on (with no host allowed past the address check) and clients may name
    images under s3://serve-images/public/.
    """
    from ray import serve

    from actors.serve_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model": tiny_model, "max_new_tokens": MAX_TOKENS, "api_key": API_KEY, "gpus_per_replica": 0,
        "max_ongoing_requests": CONCURRENT, "max_queued_requests": 32, "page_size": 16, "prepare_workers": 1,
        "max_image_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_body_bytes": 3_000_000, "body_timeout_s": 3,
        "allow_remote_images": True, "allow_s3_prefixes": "s3://serve-images/public/",
    }
    serve.run(build_app(args), name="llava-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def ask(client, model_id: str, messages: list[dict], stream: bool = False):
    return client.chat.completions.create(model=model_id, messages=messages, max_tokens=MAX_TOKENS, stream=stream)


def image_question(image, question: str = "What is shown in this image?") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question},
    ]}]


def test_health_and_models(server, model_id, tiny_model):
    assert http(f"{server}/health") == (200, '{"status":"ok"}')
    assert model_id == tiny_model.rstrip("/").split("/")[-1]


def test_streamed_equals_plain_equals_reference(client, model_id, expected):
    image = noise_image(50, 30, seed=1)
    messages = image_question(image)
    plain = ask(client, model_id, messages)
    chunks = list(ask(client, model_id, messages, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content == streamed == expected(messages, [image])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    usage = plain.usage
    assert usage.completion_tokens == MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > MAX_TOKENS


def test_multi_turn_and_two_images(client, model_id, expected):
    first, second = noise_image(40, 40, seed=2), noise_image(30, 70, seed=3)
    multi_turn = [
        {"role": "system", "content": "Answer the questions."},
        *image_question(first),
        {"role": "assistant", "content": "A small object."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the shape?"}]},
    ]
    two_images = [{"role": "user", "content": [
        {"type": "text", "text": "The first image"},
        {"type": "image_url", "image_url": {"url": data_url(first)}},
        {"type": "text", "text": "and the second image"},
        {"type": "image_url", "image_url": {"url": data_url(second)}},
        {"type": "text", "text": "differ in size and colour?"},
    ]}]
    assert ask(client, model_id, multi_turn).choices[0].message.content == expected(multi_turn, [first])
    assert ask(client, model_id, two_images).choices[0].message.content == expected(two_images, [first, second])


def test_s3_images_only_under_the_allowed_prefix(server, client, model_id, expected, s3_server):
    image = noise_image(48, 36, seed=5)
    s3_server.mkdir("serve-images")
    s3_server.pipe_file("serve-images/public/one.png", encode(image))
    s3_server.pipe_file("serve-images/private/secret.png", encode(image))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "s3://serve-images/public/one.png"}}, {"type": "text", "text": "What?"},
    ]}]
    assert ask(client, model_id, messages).choices[0].message.content == expected(messages, [image])
    existing = _post(server, _chat("s3://serve-images/private/secret.png"))
    missing = _post(server, _chat("s3://serve-images/private/nothing.png"))
    assert existing[0] == missing[0] == 400
    assert json.loads(existing[1]) == json.loads(missing[1])  # nothing tells the two apart


def test_at_most_eight_images_by_default(server, urls):
    parts = [{"type": "image_url", "image_url": {"url": urls["good"]}}] * 9 + [{"type": "text", "text": "All?"}]
    status, body = _post(server, {"messages": [{"role": "user", "content": parts}]})
    assert status == 400 and json.loads(body)["error"]["code"] == "too_many_images"


def test_concurrent_clients_get_their_own_answers_in_batches(server, client, model_id, expected):
    sizes = [(40, 40), (64, 32), (30, 90)]
    images = [noise_image(*sizes[i % len(sizes)], seed=100 + i) for i in range(CONCURRENT)]
    barrier = threading.Barrier(CONCURRENT)

    def one(image) -> str:
        barrier.wait()
        return ask(client, model_id, image_question(image)).choices[0].message.content

    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(one, images))
    assert answers == [expected(image_question(image), [image]) for image in images]
    assert len(set(answers)) > 1  # the images really lead to different answers
    stats = json.loads(http(f"{server}/v1/stats")[1])
    assert stats["scheduler"] == "continuous" and stats["peak_running"] > 1, stats


def _post(server: str, body: dict | bytes, key: str | None = API_KEY) -> tuple[int, str]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http(f"{server}/v1/chat/completions", content, key)


def _chat(image_url: str | None = None, text: str = "What is this?", **extra) -> dict:
    parts = [{"type": "text", "text": text}]
    if image_url is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"messages": [{"role": "user", "content": parts}], **extra}


@pytest.fixture(scope="module")
def urls() -> dict[str, str]:
    """A good image, one over the byte limit and one over the pixel limit of the test server."""
    from PIL import Image

    return {
        "good": data_url(noise_image(20, 20)),
        "big_bytes": data_url(noise_image(700, 700)),
        "big_pixels": data_url(Image.new("RGB", (1200, 1000), "white")),
    }


# A minimal Encapsulated PostScript file: Pillow would hand it to Ghostscript to decode.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"

# name -> (body from the urls, API key to send, expected status)
ERROR_CASES = {
    "malformed json": (lambda u: b'{"messages": [', API_KEY, 400),
    "wrong field type": (lambda u: _chat(max_tokens="ten"), API_KEY, 400),
    "content not a string or parts": (lambda u: {"messages": [{"role": "user", "content": 5}]}, API_KEY, 400),
    "undecodable image": (
        lambda u: _chat("data:image/png;base64," + base64.b64encode(b"not an image").decode()), API_KEY, 400
    ),
    "invalid base64": (lambda u: _chat("data:image/png;base64,@@@"), API_KEY, 400),
    "lone surrogate": (lambda u: b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', API_KEY, 400),
    "json nested 5,000 deep": (
        lambda u: b'{"ignored": ' + b"[" * 5000 + b"]" * 5000 + b', "messages": [{"role": "user", "content": "hi"}]}',
        API_KEY, 400,
    ),
    "postscript image": (
        lambda u: _chat("data:application/postscript;base64," + base64.b64encode(EPS).decode()), API_KEY, 400
    ),
    "max_tokens past the context": (lambda u: _chat(max_tokens=40000), API_KEY, 400),
    "max_tokens of 10^9": (lambda u: _chat(max_tokens=10**9), API_KEY, 400),
    "streamed max_tokens past the context": (lambda u: _chat(max_tokens=40000, stream=True), API_KEY, 400),
    "a text longer than the context can hold": (lambda u: _chat(text="x" * 2_900_000), API_KEY, 400),
    "n > 1": (lambda u: _chat(n=2), API_KEY, 400),
    "tools": (lambda u: _chat(tools=[{"type": "function", "function": {"name": "f"}}]), API_KEY, 400),
    "top_logprobs without logprobs": (lambda u: _chat(top_logprobs=2), API_KEY, 400),
    "two constraints": (lambda u: _chat(response_format={"type": "json_object"},
                                        structured_outputs={"regex": "[0-9]+"}), API_KEY, 400),
    "a grammar that does not compile": (lambda u: _chat(structured_outputs={"grammar": "start: foo"}), API_KEY, 400),
    "loopback image host": (lambda u: _chat("http://127.0.0.1:9/x.png"), API_KEY, 400),
    "s3 outside the allowed prefix": (lambda u: _chat("s3://serve-images/x.png"), API_KEY, 400),
    "body over the limit": (lambda u: _chat(text="x" * 3_100_000), API_KEY, 413),
    "image bytes over the limit": (lambda u: _chat(u["big_bytes"]), API_KEY, 413),
    "image pixels over the limit": (lambda u: _chat(u["big_pixels"]), API_KEY, 413),
    "unknown model": (lambda u: _chat(model="gpt-4o"), API_KEY, 404),
    "missing key": (lambda u: _chat(), None, 401),
    "wrong key": (lambda u: _chat(), "nope", 401),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_openai_shaped_and_harmless(server, urls, case):
    make_body, key, status = ERROR_CASES[case]
    got, text = _post(server, make_body(urls), key=key)
    assert got == status, text
    error = json.loads(text)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and "code" in error
    assert "Traceback" not in text and "Error:" not in text  # no exception of ours reaches a client
    assert _post(server, _chat(urls["good"]))[0] == 200


@pytest.mark.parametrize("burst", [96, 300])
def test_full_queue_answers_503_not_a_hang(server, burst):
    """16 ongoing + 32 queued fit; of a burst of simultaneous requests the rest are turned away
    without waiting for space, always by the replica with an OpenAI-shaped body, never by the proxy
    in plain text."""
    barrier = threading.Barrier(burst)

    def one(_) -> tuple[int, float, str]:
        barrier.wait()
        start = time.perf_counter()
        status, body = _post(server, _chat(max_tokens=200))
        return status, time.perf_counter() - start, body

    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one, range(burst)))
    outcomes = [(status, seconds) for status, seconds, _ in results]
    refusals = [json.loads(body) for status, _, body in results if status == 503]
    assert refusals and all(r["error"]["code"] == "queue_full" for r in refusals)
    statuses = [status for status, _ in outcomes]
    assert statuses.count(503) > 0 and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= CONCURRENT
    # Not a hang: a request refused while the queue is full is answered before the requests that
    # filled it end (a refusal held until space frees would come after the last of them). A clock
    # bound failed under CI load: 300 connections reach the proxy over seconds, and late ones are
    # refused (or admitted) late through no fault of the replica.
    refused_by = max(seconds for status, seconds in outcomes if status == 503)
    assert refused_by < max(seconds for status, seconds in outcomes if status == 200), outcomes
    assert _post(server, _chat())[0] == 200


@pytest.fixture(scope="module")
def shapes_client(server):
    """`python -m jobs.serve`'s default model, the shipped shapes checkpoint, as a second app."""
    from openai import OpenAI
    from ray import serve

    from actors.serve_app import build_app
    from jobs.serve import build_parser

    model = build_parser().parse_args([]).model
    serve.run(build_app({"model": model, "gpus_per_replica": 0, "max_new_tokens": 8}),
              name="shapes-test", route_prefix="/shapes")
    yield OpenAI(base_url=f"{server}/shapes/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete("shapes-test")


def test_the_default_served_model_names_shapes_and_colours(shapes_client):
    """What a new user of `python -m jobs.serve` sees: right answers about images they send."""
    from jobs import synthetic

    model = shapes_client.models.list().data[0].id
    right = {"shape": 0, "colour": 0}
    seeds = synthetic.heldout_seeds(30_000, 6)
    for seed in seeds:
        sample = synthetic.make_sample(seed)
        mime = "jpeg" if sample.fmt == "JPEG" else "png"
        url = f"data:image/{mime};base64," + base64.b64encode(sample.encoded()).decode()
        for kind in right:
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": synthetic.QUESTIONS[kind][0]},
            ]}]
            reply = shapes_client.chat.completions.create(model=model, messages=messages, max_tokens=8)
            answer = reply.choices[0].message.content
            right[kind] += synthetic.is_correct(kind, answer, sample.shape, sample.colour)
    assert right["shape"] >= len(seeds) - 1 and right["colour"] == len(seeds), right


# ---- a hostile client ---------------------------------------------------------------------


def _open_body(server: str, sent: bytes, length: int, key: str | None = API_KEY) -> socket.socket:
    """A POST whose headers promise `length` bytes of body, of which only `sent` are sent."""
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def _timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def test_slow_bodies_take_no_admission_slot_and_time_out(server, urls):
    """60 sockets that send `{` and stall (more than the 48 requests the replica admits): the others
    are answered meanwhile, and each stalled one gets a 408 once its 3 s are up. One without a key
    is turned away at once."""
    stalled = [_open_body(server, b"{", 1000) for _ in range(60)]
    try:
        time.sleep(1.0)
        (health, _), health_s = _timed(lambda: http(f"{server}/health"))
        assert health == 200 and health_s < 1.0, health_s
        assert _post(server, _chat(urls["good"]))[0] == 200
        anonymous = _open_body(server, b"{", 1000, key=None)
        assert anonymous.recv(4096).startswith(b"HTTP/1.1 401")
        anonymous.close()
        assert stalled[0].recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for sock in stalled:
            sock.close()


def test_a_huge_text_is_refused_while_the_endpoint_keeps_answering(server, client, model_id, urls):
    """2.9 MB of text (a 5 MB one took 14.6 s on the event loop and stalled every other client)."""
    with ThreadPoolExecutor(1) as pool:
        huge = pool.submit(_post, server, _chat(text="x " * 1_450_000))
        time.sleep(0.05)
        (health, _), health_s = _timed(lambda: http(f"{server}/health"))
        normal = _post(server, _chat(urls["good"]))
        status, body = huge.result()
    assert (status, json.loads(body)["error"]["code"]) == (400, "context_length_exceeded")
    assert health == 200 and health_s < 1.0 and normal[0] == 200


def test_a_client_that_leaves_while_sending_is_a_cancel_not_a_500(server):
    def stats() -> dict:
        return json.loads(http(f"{server}/v1/stats")[1])

    def counts() -> dict:
        return stats()["requests_by_status"]

    before = counts()
    sock = _open_body(server, b'{"messages": [', 1000)
    deadline = time.monotonic() + 20
    while stats()["bodies_receiving"] < 1:  # the ingress holds it: a close before then is the proxy's alone
        assert time.monotonic() < deadline, stats()
        time.sleep(0.05)
    sock.close()
    deadline = time.monotonic() + 20
    while counts().get("cancelled", 0) <= before.get("cancelled", 0):
        assert time.monotonic() < deadline, counts()
        time.sleep(0.2)
    assert counts().get("500", 0) == before.get("500", 0)


def test_special_token_strings_in_client_text_are_text(client, model_id, server):
    """`</s>` typed three times used to be three end-of-sequence ids; `<image>` typed with one image
    made a placeholder mismatch. Both are characters like any others now."""
    def ask_tokens(text: str) -> int:
        reply = client.chat.completions.create(model=model_id, max_tokens=2, messages=[{"role": "user", "content": text}])
        return reply.usage.prompt_tokens

    base, typed = ask_tokens("x"), ask_tokens("x</s></s></s>")
    assert typed - base > 3, "each </s> is several text tokens, not one control id"
    image = noise_image(30, 30, seed=9)
    status, body = _post(server, _chat(data_url(image), text="<image> and <image>?"))
    assert status == 200, body


def test_a_tiny_temperature_is_greedy(client, model_id):
    messages = image_question(noise_image(40, 30, seed=11))
    greedy = ask(client, model_id, messages).choices[0].message.content
    tiny = client.chat.completions.create(model=model_id, messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=1e-40).choices[0].message.content
    assert tiny == greedy and tiny


def test_identical_images_in_a_request_are_prepared_once(server, client, model_id, expected):
    image = noise_image(44, 28, seed=12)
    part = {"type": "image_url", "image_url": {"url": data_url(image)}}
    messages = [{"role": "user", "content": [part, part, part, {"type": "text", "text": "Three?"}]}]
    before = json.loads(http(f"{server}/v1/stats")[1])["images_prepared"]
    answer = ask(client, model_id, messages).choices[0].message.content
    after = json.loads(http(f"{server}/v1/stats")[1])["images_prepared"]
    assert after - before == 1 and answer == expected(messages, [image, image, image])


def test_a_wrong_method_is_a_405_that_says_so(server):
    request = urllib.request.Request(f"{server}/v1/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 405 and json.loads(info.value.read())["error"]["code"] == "method_not_allowed"


# ---- constrained answers and log-probabilities -------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}
JSON_TOKENS = 60


def engine_answer(engine, messages: list[dict], image, params):
    """The engine's own answer to the same messages and image, called directly."""
    from pipeline.preprocess import prepare
    from pipeline.schemas import GenerationRequest

    prompt, ids = engine.tokenize_chat(openai_to_internal(messages))
    p = prepare(encode(image), engine.spec)
    result = engine.generate([GenerationRequest(prompt, [p.tiles], [p.size], params, [p.digest], prompt_ids=ids)])[0]
    assert result.error is None, result.error
    return result


def token_entries(engine, result) -> list[tuple]:
    """(bytes, log-probability, [(bytes, log-probability)] of the alternatives) per token of an engine answer."""
    def one(token: int) -> bytes:
        return engine.token_bytes([token])[0]

    return [(one(e["token"]), e["logprob"], [(one(t["token"]), t["logprob"]) for t in e["top"]])
            for e in result.token_logprobs]


def reply_entries(content) -> list[tuple]:
    """The same from the `logprobs.content` of a reply (or a stream's chunks, joined)."""
    return [(bytes(e.bytes), e.logprob, [(bytes(t.bytes), t.logprob) for t in e.top_logprobs]) for e in content]


def streamed_entries(chunks) -> list:
    return [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]


def same_entries(got: list[tuple], expected: list[tuple]) -> bool:
    """Equal tokens, and log-probabilities equal to float32 rounding (two engines, other batches,
    a prompt computed whole or partly read from the prefix cache)."""
    def close(a: float, b: float) -> bool:
        return abs(a - b) < 1e-4

    return len(got) == len(expected) and all(
        gb == eb and close(gl, el) and [t for t, _ in gt] == [t for t, _ in et]
        and all(close(a, b) for (_, a), (_, b) in zip(gt, et))
        for (gb, gl, gt), (eb, el, et) in zip(got, expected)
    )


def test_a_json_schema_answer_is_valid_and_the_engines_own_plain_and_streamed(client, model_id, engine):
    import jsonschema

    from pipeline.config import Constraint, SamplingParams

    image = noise_image(40, 36, seed=21)
    messages = image_question(image, "Describe the image as JSON.")
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    ask_json = dict(model=model_id, messages=messages, max_tokens=JSON_TOKENS, response_format=fmt, logprobs=True)
    plain = client.chat.completions.create(**ask_json)
    chunks = list(client.chat.completions.create(**ask_json, stream=True))
    answer = plain.choices[0].message.content
    jsonschema.validate(json.loads(answer), SCHEMA)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert plain.choices[0].finish_reason == "stop" and chunks[-1].choices[0].finish_reason == "stop"
    own = engine_answer(engine, messages, image, SamplingParams(max_new_tokens=JSON_TOKENS, logprobs=0,
                                                                 constraint=Constraint.json_schema(SCHEMA)))
    assert answer == own.response
    expected = token_entries(engine, own)  # the same tokens, each with its log-probability
    assert same_entries(reply_entries(plain.choices[0].logprobs.content), expected)
    assert same_entries(reply_entries(streamed_entries(chunks)), expected)


def test_vllm_clients_choices_come_through_extra_body(client, model_id, engine):
    from pipeline.config import Constraint, SamplingParams

    choices = ["circle", "circles", "square", "triangle"]
    image = noise_image(44, 30, seed=22)
    messages = image_question(image, "What shape is it?")
    reply = client.chat.completions.create(model=model_id, messages=messages, max_tokens=MAX_TOKENS,
                                           extra_body={"structured_outputs": {"choice": choices}})
    own = engine_answer(engine, messages, image, SamplingParams(max_new_tokens=MAX_TOKENS,
                                                                 constraint=Constraint.choices(choices)))
    assert reply.choices[0].message.content in choices
    assert reply.choices[0].message.content == own.response


def test_logprobs_with_top_alternatives_plain_and_streamed_are_the_engines(client, model_id, engine):
    from pipeline.config import SamplingParams

    image = noise_image(50, 30, seed=1)  # its answer runs to max_tokens: no end-of-sequence token
    messages = image_question(image)
    ask_logprobs = dict(model=model_id, messages=messages, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=3)
    plain = client.chat.completions.create(**ask_logprobs)
    chunks = list(client.chat.completions.create(**ask_logprobs, stream=True))
    content = plain.choices[0].logprobs.content
    assert plain.choices[0].finish_reason == "length" and len(content) == plain.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in content).decode() == plain.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    # every token once over the stream; log-probabilities to float32 rounding (the second request
    # reuses the first one's cached prompt, which changes the last bits of the first logits)
    assert same_entries(reply_entries(streamed_entries(chunks)), reply_entries(content))
    text, raw = "", b""
    for choice in (c.choices[0] for c in chunks if c.choices):
        text += choice.delta.content or ""
        raw += b"".join(bytes(e.bytes) for e in (choice.logprobs.content if choice.logprobs else []))
        assert raw.startswith(text.encode())  # a piece of text goes out with its tokens, never before them
    own = engine_answer(engine, messages, image, SamplingParams(max_new_tokens=MAX_TOKENS, logprobs=3))
    assert same_entries(reply_entries(content), token_entries(engine, own))
    assert plain.choices[0].logprobs is not None and ask(client, model_id, messages).choices[0].logprobs is None


def test_constraints_that_cannot_be_met_are_openai_shaped_400s(client, model_id):
    from openai import APIError, BadRequestError

    nonsense = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "bad", "schema": nonsense}}
    for stream, extra in [(False, {"response_format": bad_schema}),
                          (True, {"extra_body": {"structured_outputs": {"regex": "[a-"}}})]:
        with pytest.raises(BadRequestError) as info:
            client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, stream=stream, **extra)
        assert info.value.code == "invalid_response_format"
        assert "does not compile" in info.value.message
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    short = dict(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, response_format=fmt)
    with pytest.raises(BadRequestError) as info:  # three tokens cannot finish the object
        client.chat.completions.create(**short)
    assert info.value.code == "answer_incomplete" and "within 3 tokens" in info.value.message
    with pytest.raises(APIError) as info:  # a stream has begun: the error is its last event
        list(client.chat.completions.create(**short, stream=True))
    assert info.value.code == "answer_incomplete"
