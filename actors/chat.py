"""From a client's request body to an engine request: parse, check, render and tokenise it.

Plain Python, no Ray and no web framework. The replica runs `prepare_text` in a thread, off its
event loop, because its cost grows with the body: a 5 MB text took 14.6 s to tokenise on the loop
and stalled every stream and health check meanwhile. Cheap checks come first, so a hostile body
is refused for the price of counting its characters: a text can only be as few tokens as its
characters divided by the longest token's, so one longer than the context allows in characters is
refused before any tokenising.

Lengths are checked before anything is sent, as vLLM does: a `max_tokens` the prompt leaves no
room for in the context, or more than the KV cache holds, is a 400; without `max_tokens` the
answer is cut to the room the context leaves.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from actors import openai_api as api
from pipeline.config import SamplingParams


@dataclass
class PreparedText:
    """A checked request with its prompt rendered and tokenised (one image token per image)."""

    chat: api.ChatRequest
    prompt: str
    prompt_ids: list[int]


def parse_body(raw: bytes, default_max_tokens: int, max_images: int | None) -> api.ChatRequest:
    """The body as a checked chat request (raises `ApiError`)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise api.bad_request("the body nests too deeply to be read", "invalid_json") from None
    except ValueError as exc:
        raise api.bad_request(f"the body is not valid JSON: {exc}", "invalid_json") from None
    return api.parse_chat_request(body, default_max_tokens, max_images)


def prepare_text(engine: Any, raw: bytes, default_max_tokens: int, max_images: int | None,
                 served_names: tuple[str, ...]) -> PreparedText:
    """Parse, check and tokenise one request body against `engine` (raises `ApiError`)."""
    chat = parse_body(raw, default_max_tokens, max_images)
    if chat.model not in (None, *served_names):
        raise api.ApiError(404, f"model {chat.model!r} is not served here; use {served_names[0]!r}",
                           code="model_not_found")
    most = engine.context * engine.max_char_tokens()
    if chat.text_chars > most:
        raise api.bad_request(
            f"the messages hold {chat.text_chars} characters, more than this model's context of {engine.context} "
            "tokens can take; shorten them", "context_length_exceeded",
        )
    try:
        prompt, ids = engine.tokenize_chat(chat.messages)
    except Exception as exc:  # a prompt that cannot be built depends on the request alone
        raise api.bad_request(f"cannot build the prompt: {exc}", "invalid_prompt") from None
    return PreparedText(chat, prompt, ids)


def fit_lengths(chat: api.ChatRequest, prompt_tokens: int, context: int, kv_tokens: int | None) -> SamplingParams:
    """The options to generate with, once the prompt's length (images included) is known.

    A prompt that fills the context, or a `max_tokens` it leaves no room for, is refused; so is an
    answer the KV cache cannot hold. An unset `max_tokens` is cut to the room left.
    """
    params = chat.params
    if prompt_tokens >= context or (chat.max_tokens_given and prompt_tokens + params.max_new_tokens > context):
        raise api.context_error(prompt_tokens, params.max_new_tokens, context)
    if prompt_tokens + params.max_new_tokens > context:
        params = dataclasses.replace(params, max_new_tokens=context - prompt_tokens)
    if kv_tokens is not None and prompt_tokens + params.max_new_tokens > kv_tokens:
        raise api.bad_request(
            f"the request needs {prompt_tokens + params.max_new_tokens} tokens of KV cache ({prompt_tokens} in the "
            f"messages, {params.max_new_tokens} in the completion) but this server holds {kv_tokens}; ask for "
            "fewer tokens", "kv_cache_exceeded",
        )
    return params
