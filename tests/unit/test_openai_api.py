"""Request parsing and reply shapes of the OpenAI API (constrained answers and log-probabilities
included), without Ray or a model."""

from __future__ import annotations

import base64
import json

import pytest

from actors import openai_api as api
from actors import structured
from pipeline.config import Constraint
from tests.helpers import encode, noise_image

PNG = encode(noise_image(8, 8))
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(url: str = DATA_URL) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def parse(**body) -> api.ChatRequest:
    body.setdefault("messages", [user(text("hi"))])
    return api.parse_chat_request(body, default_max_tokens=16)


def refused(**body) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        parse(**body)
    return info.value


def test_parts_become_internal_messages_with_images_in_order():
    req = parse(
        messages=[
            {"role": "developer", "content": "Be brief."},
            user(image("data:image/png;base64,AAAA"), text("What is this?")),
            {"role": "assistant", "content": [text("A cat.")]},
            user(text("And these?"), image("s3://b/1.png"), image("s3://b/2.png")),
        ]
    )
    assert req.messages == [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [{"type": "image"}, text("What is this?")]},
        {"role": "assistant", "content": [text("A cat.")]},
        {"role": "user", "content": [text("And these?"), {"type": "image"}, {"type": "image"}]},
    ]
    assert req.image_urls == ["data:image/png;base64,AAAA", "s3://b/1.png", "s3://b/2.png"]


def test_sampling_options_and_defaults():
    req = parse(max_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop="\n", stream=True, model="m")
    assert (req.params.max_new_tokens, req.params.temperature, req.params.top_p) == (5, 0.7, 0.9)
    assert (req.params.seed, req.params.stop, req.stream, req.model) == (3, ("\n",), True, "m")
    assert parse(max_tokens=5, max_completion_tokens=7).params.max_new_tokens == 7
    default = parse()
    assert (default.params.max_new_tokens, default.params.temperature, default.stream) == (16, 0.0, False)
    assert parse(user="someone", n=1, logprobs=False, tools=[]).params.max_new_tokens == 16


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "hi"},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [user({"type": "input_audio"})]},
        {"messages": [user({"type": "image_url", "image_url": {}})]},
        {"max_tokens": "ten"},
        {"max_tokens": True},
        {"max_tokens": 0},
        {"temperature": "hot"},
        {"temperature": 3},
        {"top_p": 0},
        {"seed": 1.5},
        {"stream": "yes"},
        {"stop": ["a", 1]},
        {"model": 7},
        {"n": 2},
        {"tools": [{"type": "function"}]},
        {"logprobs": "yes"},
        {"guided_json": {"type": "object"}},
    ],
)
def test_bad_requests_are_400(body):
    err = refused(**body)
    assert err.status == 400
    assert set(err.body()["error"]) >= {"message", "type", "code"}


def test_body_must_be_an_object():
    with pytest.raises(api.ApiError) as info:
        api.parse_chat_request([1, 2], 16)
    assert info.value.status == 400


def test_engine_errors_map_to_statuses_and_never_show_our_exceptions():
    assert api.engine_error("prompt: the prompt is 5000 tokens, over the model's context", "r1").status == 400
    ours = api.engine_error("generate: RuntimeError: boom at /srv/model.py:12", "r1")
    assert ours.status == 500 and "boom" not in ours.message and "RuntimeError" not in ours.message
    assert "r1" in ours.message and "r1" in api.internal_error("r1").message


def test_client_text_must_be_valid_unicode_and_tiny_temperatures_are_greedy():
    for body in ({"messages": [{"role": "user", "content": "a\ud800b"}]},
                 {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
                 {"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}):
        with pytest.raises(api.ApiError) as info:
            api.parse_chat_request(body, 16)  # what json.loads makes of "\\ud800"
        assert (info.value.status, info.value.code) == (400, "invalid_text")
    chat = api.parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-40}, 16)
    assert chat.params.temperature == 0.0 and not chat.max_tokens_given and chat.text_chars == 2


def test_text_deltas_rebuild_the_answer_exactly():
    words = ["Hel", "lo", " wor", "ld", "!!"]

    def decode(ids):
        return "".join(words[i] for i in ids)

    assert api.text_deltas("Hello world!!", [0, 1, 2, 3, 4], decode) == list(zip(words, range(1, 6)))
    # a stop string cut the answer short: later text never leaks into the stream
    cut = api.text_deltas("Hello wor", [0, 1, 2, 3, 4], decode)
    assert "".join(piece for piece, _ in cut) == "Hello wor" and cut[-1][1] == 3
    # "é" split over two tokens: the first decodes to a replacement char, which is held back and
    # goes out with the second (and so do both tokens' log-probabilities)
    split = {1: "caf\ufffd", 2: "café"}
    assert api.text_deltas("café", [0, 1], lambda ids: split[len(ids)]) == [("café", 2)]
    assert api.text_deltas("", [], decode) == []


def test_sse_events_follow_the_chunk_format():
    from pipeline.schemas import GenerationResult

    req = parse(stream=True, stream_options={"include_usage": True})
    result = GenerationResult(response="ab", finish_reason="stop", num_input_tokens=4, num_output_tokens=2)
    events = api.sse_events(req, "tiny", result, [("a", 1), ("b", 2)])
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == req.request_id for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "ab"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_too_many_images_is_a_400():
    body = {"messages": [user(*[image()] * 3, text("Compare."))]}
    assert len(api.parse_chat_request(body, 16, max_images=3).image_urls) == 3
    with pytest.raises(api.ApiError) as info:
        api.parse_chat_request(body, 16, max_images=2)
    assert (info.value.status, info.value.code) == (400, "too_many_images")


# ---- constrained answers and log-probabilities ----------------------------------------------

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize("body, constraint", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     Constraint.json_schema(SCHEMA)),
    ({"response_format": {"type": "json_object"}}, Constraint.json_schema({"type": "object"})),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, Constraint.choices(["yes", "no"])),
    ({"structured_outputs": {"regex": "[0-9]+", "json": None, "disable_fallback": False}},
     Constraint("regex", "[0-9]+")),
    ({"structured_outputs": {"json": SCHEMA}}, Constraint.json_schema(SCHEMA)),
    ({"structured_outputs": {"json": '{"type": "object"}'}}, Constraint("json_schema", '{"type": "object"}')),
    ({"structured_outputs": {"json_object": True}}, Constraint.json_schema({"type": "object"})),
    ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, Constraint("grammar", 'start: "a" | "b"')),
    ({"response_format": {"type": "text"}, "structured_outputs": {"choice": ["a"]}}, Constraint.choices(["a"])),
])
def test_response_format_and_structured_outputs_become_the_engines_constraint(body, constraint):
    assert parse(**body).params.constraint == constraint


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]}}, "not both"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "exactly one"),
    ({"structured_outputs": {}}, "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "not supported"),
    ({"structured_outputs": {"choice": []}}, "choices"),
    ({"structured_outputs": {"choice": ["a", 1]}}, "choices"),
    ({"structured_outputs": {"choice": "a"}}, "list"),
    ({"structured_outputs": {"regex": ""}}, "empty"),
    ({"structured_outputs": {"json": "[1]"}}, "JSON object"),
    ({"structured_outputs": {"json_object": "yes"}}, "true"),
    ({"structured_outputs": ["choice"]}, "object"),
    ({"response_format": "json"}, "'type'"),
    ({"response_format": {"type": "xml"}}, "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}, "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": 1}}},
     "strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": _nested(5000)}}}, "deeply"),
])
def test_a_response_format_that_cannot_be_used_is_a_400_that_says_why(body, says):
    err = refused(**body)
    assert (err.status, err.code) == (400, "invalid_response_format")
    assert says in err.message


def test_logprobs_and_top_logprobs():
    assert parse().params.logprobs is None and parse(logprobs=False).params.logprobs is None
    assert parse(logprobs=True).params.logprobs == 0
    assert parse(logprobs=True, top_logprobs=20).params.logprobs == 20
    for body in ({"top_logprobs": 2}, {"logprobs": False, "top_logprobs": 0}, {"logprobs": True, "top_logprobs": 21},
                 {"logprobs": True, "top_logprobs": -1}, {"logprobs": True, "top_logprobs": 2.0}):
        err = refused(**body)
        assert err.status == 400 and "top_logprobs" in err.message


# Token ids -> their bytes: "é" is split over two tokens, and 9 is the end of sequence.
TOKEN_BYTES = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b" ok", 9: b"</s>"}


def token_bytes(ids: list[int]) -> list[bytes]:
    return [TOKEN_BYTES[i] for i in ids]


def test_logprobs_in_openais_shape_keep_each_tokens_own_bytes():
    entries = [
        {"token": 1, "logprob": -0.5, "top": [{"token": 1, "logprob": -0.5}, {"token": 4, "logprob": -1.5}]},
        {"token": 2, "logprob": -0.25, "top": []},
        {"token": 3, "logprob": float("-inf"), "top": []},
        {"token": 9, "logprob": -0.125, "top": []},
    ]
    content = structured.logprob_content(entries, token_bytes)
    assert content[0] == {"token": "caf", "bytes": list(b"caf"), "logprob": -0.5, "top_logprobs": [
        {"token": "caf", "bytes": list(b"caf"), "logprob": -0.5},
        {"token": " ok", "bytes": list(b" ok"), "logprob": -1.5},
    ]}
    assert bytes(content[1]["bytes"] + content[2]["bytes"]).decode() == "é"
    assert content[1]["token"] == "\ufffd"
    assert content[2]["logprob"] == structured.LOWEST_LOGPROB  # JSON has no -inf
    assert content[3]["token"] == "</s>" and content[3]["top_logprobs"] == []
    assert json.loads(json.dumps(content, allow_nan=False)) == content


def test_replies_carry_logprobs_only_when_asked():
    from pipeline.schemas import GenerationResult

    req = parse(logprobs=True)
    result = GenerationResult(response="ab", finish_reason="stop", num_output_tokens=1)
    content = [{"token": "ab", "bytes": [97, 98], "logprob": -0.5, "top_logprobs": []}]
    assert api.completion_body(req, "tiny", result, content)["choices"][0]["logprobs"] == {"content": content}
    assert api.completion_body(req, "tiny", result)["choices"][0]["logprobs"] is None
    chunks = api.Chunks(req, "tiny")
    assert json.loads(chunks.content("ab", content).removeprefix("data: "))["choices"][0]["logprobs"] == {
        "content": content}
    assert json.loads(chunks.content("ab").removeprefix("data: "))["choices"][0]["logprobs"] is None


def test_constrained_answers_that_fail_in_the_engine_are_the_clients_400s():
    bad = api.engine_error("prompt: the regex does not compile: unclosed character class", "r1")
    assert (bad.status, bad.code) == (400, "invalid_response_format") and "unclosed" in bad.message
    short = api.engine_error("generate: the answer did not complete the schema within 3 tokens", "r1")
    assert (short.status, short.code) == (400, "answer_incomplete")
    assert "within 3 tokens" in short.message and "max_tokens" in short.message
