"""Request parsing and reply shapes of the OpenAI API, without Ray or a model."""

from __future__ import annotations

import base64
import json

import pytest

from actors import openai_api as api
from pipeline.config import ConfigError, EngineConfig, ServeOptions
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
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
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

    assert api.text_deltas("Hello world!!", [0, 1, 2, 3, 4], decode) == words
    # a stop string cut the answer short: later text never leaks into the stream
    assert "".join(api.text_deltas("Hello wor", [0, 1, 2, 3, 4], decode)) == "Hello wor"
    # "é" split over two tokens: the first decodes to a replacement char, which is held back
    split = {1: "caf\ufffd", 2: "café"}
    assert api.text_deltas("café", [0, 1], lambda ids: split[len(ids)]) == ["café"]
    assert api.text_deltas("", [], decode) == []


def test_sse_events_follow_the_chunk_format():
    from pipeline.schemas import GenerationResult

    req = parse(stream=True, stream_options={"include_usage": True})
    result = GenerationResult(response="ab", finish_reason="stop", num_input_tokens=4, num_output_tokens=2)
    events = api.sse_events(req, "tiny", result, ["a", "b"])
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == req.request_id for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "ab"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_serve_options_from_config_strings():
    opts = ServeOptions.from_args({
        "model": "m", "replicas": "2", "allow_remote_images": "true", "gpus_per_replica": "none",
        "quantization": "none", "attn": "eager", "scheduler": "static", "allow_s3_prefixes": "s3://a/b/, s3://c/",
        "kv_cache_mb": "64",
    })
    assert (opts.replicas, opts.allow_remote_images, opts.gpus_per_replica) == (2, True, None)
    assert opts.engine == EngineConfig(model="m", attn_implementation="eager", scheduler="static", kv_cache_mb=64.0)
    assert opts.allow_s3_prefixes == ("s3://a/b/", "s3://c/") and opts.model == "m"
    assert opts.describe()["api_key"] is None
    assert ServeOptions(engine=EngineConfig(model="m"), api_key="k").describe()["api_key"] == "***"
    for bad in ({"model": "m", "colour": "red"}, {"model": "m", "max_batch_size": "0"}, {"model": "m", "top": "1"},
                {"model": "m", "allow_s3_prefixes": "bucket/x"}, {"model": "m", "max_images_per_request": "0"}):
        with pytest.raises(ConfigError):
            ServeOptions.from_args(bad)
    with pytest.raises(ConfigError):
        ServeOptions(engine=EngineConfig(model="m"), api_key="")


def test_too_many_images_is_a_400():
    body = {"messages": [user(*[image()] * 3, text("Compare."))]}
    assert len(api.parse_chat_request(body, 16, max_images=3).image_urls) == 3
    with pytest.raises(api.ApiError) as info:
        api.parse_chat_request(body, 16, max_images=2)
    assert (info.value.status, info.value.code) == (400, "too_many_images")


def test_the_shipped_serve_config_is_valid_options():
    import yaml

    from pathlib import Path

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "actors" / "serve_config.yaml").read_text())
    options = ServeOptions.from_args(config["applications"][0]["args"])
    assert options.engine.scheduler == "continuous" and options.allow_s3_prefixes == ()
