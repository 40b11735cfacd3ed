"""A client's body to an engine request: cheap refusals before tokenising, client text tokenised as
text, ids equal to the job's tokenising, and lengths checked against the context and the KV cache."""

from __future__ import annotations

import json

import pytest

from actors import chat
from actors.openai_api import ApiError, parse_chat_request
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest
from tests.helpers import encode, noise_image


def _body(text: str, images: int = 0, **extra) -> bytes:
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}] * images + [{"type": "text", "text": text}]
    return json.dumps({"messages": [{"role": "user", "content": parts}], **extra}).encode()


def _prepare(engine, raw: bytes) -> chat.PreparedText:
    return chat.prepare_text(engine, raw, 12, 8, (engine.model_name,))


def _refused(engine, raw: bytes) -> ApiError:
    with pytest.raises(ApiError) as info:
        _prepare(engine, raw)
    return info.value


def test_ids_equal_the_jobs_tokenising_of_the_same_prompt(engine):
    image = prepare(encode(noise_image(60, 40, seed=1)), engine.spec)
    prepared = _prepare(engine, _body("What colour is it?", images=1))
    by_ids = GenerationRequest(prepared.prompt, [image.tiles], [image.size], prompt_ids=prepared.prompt_ids)
    by_text = GenerationRequest(prepared.prompt, [image.tiles], [image.size])
    assert engine.tokenize(by_ids) == engine.tokenize(by_text)


def test_special_token_strings_a_client_types_are_text(engine):
    """`</s></s></s>` used to become three end-of-sequence ids in the prompt, `<image>` a placeholder."""
    tokenizer = engine.tokenizer
    for text in ("</s></s></s>", "hi <s> there <pad><unk>", "<image> is a word here"):
        prepared = _prepare(engine, _body(text))
        assert text in prepared.prompt
        assert tokenizer.decode(prepared.prompt_ids) == tokenizer.decode(tokenizer(prepared.prompt)["input_ids"])
        typed = [t for t in prepared.prompt_ids[1:] if t in engine.special_ids]
        assert typed == [], f"{text!r} became control ids {typed}"
    plain = len(_prepare(engine, _body("")).prompt_ids)
    as_text = len(tokenizer("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"])
    assert len(_prepare(engine, _body("</s></s></s>")).prompt_ids) == plain + 3 * as_text


def test_a_huge_text_is_refused_by_its_length_before_tokenising(engine, monkeypatch):
    monkeypatch.setattr(engine, "tokenize_chat", lambda messages: pytest.fail("tokenised a hopeless prompt"))
    error = _refused(engine, _body("x" * (engine.context * engine.max_char_tokens() + 1)))
    assert (error.status, error.code) == (400, "context_length_exceeded")


@pytest.mark.parametrize("raw, code", [
    (b"[" * 5000 + b"]" * 5000, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "invalid_text"),
    (b'{"messages": [', "invalid_json"),
])
def test_bad_bodies_are_400s(engine, raw, code):
    error = _refused(engine, raw)
    assert (error.status, error.code) == (400, code)


def test_lengths_are_checked_against_the_context_and_the_cache():
    request = parse_chat_request(json.loads(_body("q", max_tokens=2000)), 12)
    with pytest.raises(ApiError, match="maximum context length is 1024 tokens.*2603 tokens \\(603 in the messages"):
        chat.fit_lengths(request, 603, 1024, None)
    default = parse_chat_request(json.loads(_body("q")), 2000)  # the server's default is cut, not refused
    assert chat.fit_lengths(default, 603, 1024, None).max_new_tokens == 421
    with pytest.raises(ApiError) as info:
        chat.fit_lengths(parse_chat_request(json.loads(_body("q", max_tokens=400)), 12), 603, 1024, 512)
    assert info.value.code == "kv_cache_exceeded"
    with pytest.raises(ApiError, match="maximum context length"):
        chat.fit_lengths(parse_chat_request(json.loads(_body("q", max_tokens=10**9)), 12), 10, 1024, None)
