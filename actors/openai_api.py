"""The OpenAI chat-completions wire format: parse and check requests, shape replies and stream chunks.

Plain Python with no Ray and no web framework, so every rule a client can trip over is unit-tested
without starting a server. A request that cannot be served raises `ApiError` with the HTTP status
and the OpenAI error body the client will see; the replica turns it into a response and goes on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from actors import structured
from pipeline.config import MAX_TOP_LOGPROBS, Constraint, SamplingParams
from pipeline.schemas import GenerationResult

ROLES = ("system", "developer", "user", "assistant")

# Options a client may send that this server cannot honour; each maps to the value that means "off".
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logit_bias": None,
    "audio": None,
    "prediction": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    # vLLM's older constraint fields: refused, or a client relying on them gets an unconstrained answer
    "guided_json": None,
    "guided_choice": None,
    "guided_regex": None,
    "guided_grammar": None,
}
# The row error of a constrained answer that ran out of tokens (actors/answer.py).
INCOMPLETE = "generate: the answer did not complete"


class ApiError(Exception):
    """A request the server refuses, with the status and OpenAI error `type`/`code` to answer with."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    """The OpenAI error envelope, which the official clients parse into their exception types."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def bad_request(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code)


@dataclass
class ChatRequest:
    """A checked chat request: messages in the internal shape, image URLs in placeholder order.

    `max_tokens_given` says the client chose the answer's length (so a prompt that leaves no room
    for it is refused rather than cut); `text_chars` counts the characters of every text part, for
    checks that can refuse a huge prompt before it is tokenised.
    """

    messages: list[dict]
    image_urls: list[str]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    max_tokens_given: bool = False
    text_chars: int = 0
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field(body: dict, name: str, check: Callable[[Any], bool], expected: str) -> Any:
    """A field's value, or None when absent or null; a value of the wrong type is a 400."""
    value = body.get(name)
    if value is not None and not check(value):
        raise bad_request(f"'{name}' must be {expected}; got {json.dumps(value)[:100]}", "invalid_type")
    return value


def _text(value: str, where: str) -> str:
    """Client text, refused when it is not valid Unicode (JSON lets a lone surrogate through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} is not valid Unicode text (it holds a lone surrogate)", "invalid_text") from None
    return value


def _parse_part(part: Any, where: str) -> tuple[dict, str | None]:
    """One OpenAI content part -> an internal part and, for images, the image's URL."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad_request(f"{where} must be an object with a 'type'", "invalid_type")
    if part["type"] == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text must be a string", "invalid_type")
        return {"type": "text", "text": _text(part["text"], f"{where}.text")}, None
    if part["type"] == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where}.image_url.url must be a non-empty string", "invalid_type")
        return {"type": "image"}, url
    raise bad_request(f"{where} has unsupported type {part['type']!r}; use 'text' or 'image_url'", "unsupported_content")


def parse_messages(raw: Any) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> internal `{"role", "content": [parts]}` messages and their image URLs.

    A `developer` message is the newer name of a system message and is treated as one.
    """
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty array", "invalid_type")
    messages: list[dict] = []
    urls: list[str] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", "unsupported_role")
        if message.get("tool_calls"):
            raise bad_request(f"{where}: tool calls are not supported", "unsupported_parameter")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": _text(content, f"{where}.content")}]
        elif isinstance(content, list):
            parts = []
            for j, raw_part in enumerate(content):
                part, url = _parse_part(raw_part, f"{where}.content[{j}]")
                parts.append(part)
                if url is not None:
                    urls.append(url)
        else:
            raise bad_request(f"{where}.content must be a string or an array of parts", "invalid_type")
        messages.append({"role": "system" if role == "developer" else role, "content": parts})
    return messages, urls


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad_request("'stop' must be a non-empty string or an array of up to 4 of them", "invalid_type")
    return tuple(stops)


def _check_unsupported(body: dict) -> None:
    for name, off in UNSUPPORTED_OPTIONS.items():
        value = body.get(name)
        if value is not None and value != off and value != []:
            raise bad_request(f"'{name}' is not supported by this server", "unsupported_parameter")
    n = _field(body, "n", _is_int, "an integer")
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "unsupported_parameter")


def _parse_logprobs(body: dict) -> int | None:
    """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
    wanted = _field(body, "logprobs", lambda v: isinstance(v, bool), "a boolean")
    top = _field(body, "top_logprobs", _is_int, "an integer")
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}")
    return (top or 0) if wanted else None


def _parse_constraint(body: dict) -> Constraint | None:
    try:
        return structured.constraint_of(body)
    except ValueError as exc:
        raise bad_request(str(exc), "invalid_response_format") from None


def parse_chat_request(body: Any, default_max_tokens: int, max_images: int | None = None) -> ChatRequest:
    """Check a decoded JSON body and turn it into a `ChatRequest` (raises `ApiError`).

    Fields this server does not know are ignored, as OpenAI clients send extras such as `user`;
    fields it knows must have the right type, and options it cannot honour are refused rather
    than silently dropped.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", "invalid_type")
    _check_unsupported(body)
    model = _field(body, "model", lambda v: isinstance(v, str), "a string")
    max_tokens = _field(body, "max_completion_tokens", _is_int, "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", _is_int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request("'max_tokens' must be at least 1")
    temperature = _field(body, "temperature", _is_number, "a number")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad_request("'temperature' must be between 0 and 2")
    top_p = _field(body, "top_p", _is_number, "a number")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request("'top_p' must be in (0, 1]")
    seed = _field(body, "seed", _is_int, "an integer")
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean") or False
    stream_options = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    messages, urls = parse_messages(body.get("messages"))
    if max_images is not None and len(urls) > max_images:
        raise bad_request(f"the request has {len(urls)} images; at most {max_images} are allowed", "too_many_images")
    params = SamplingParams(
        max_new_tokens=max_tokens or default_max_tokens,
        temperature=float(temperature or 0.0),
        top_p=float(top_p if top_p is not None else 1.0),
        seed=seed,
        stop=tuple(_text(s, "stop") for s in _parse_stop(body.get("stop"))),
        constraint=_parse_constraint(body),
        logprobs=_parse_logprobs(body),
    )
    chars = sum(len(p["text"]) for m in messages for p in m["content"] if p["type"] == "text")
    return ChatRequest(messages, urls, params, stream, bool(stream_options.get("include_usage")), model,
                       max_tokens is not None, chars)


# ---- replies --------------------------------------------------------------------------------


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.num_input_tokens,
        "completion_tokens": result.num_output_tokens,
        "total_tokens": result.num_input_tokens + result.num_output_tokens,
    }


def completion_body(request: ChatRequest, model: str, result: GenerationResult,
                    logprobs: list[dict] | None = None) -> dict[str, Any]:
    """A `chat.completion` object for a finished result, with its tokens' log-probabilities in
    OpenAI's shape when they were asked for (`structured.logprob_content`)."""
    return {
        "id": request.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.response},
                "finish_reason": result.finish_reason,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
            }
        ],
        "usage": usage(result),
    }


def text_deltas(response: str, token_ids: list[int], decode: Callable[[list[int]], str]) -> list[tuple[str, int]]:
    """Split a finished answer into per-token text pieces whose concatenation is exactly `response`,
    each with the number of tokens made by its end (whose log-probabilities go out with it).

    Each token's prefix is decoded; a prefix that is not yet a prefix of the answer (half of a
    multi-byte character, or text past a stop string) waits for a later token, and whatever is
    left at the end goes out as a last piece.
    """
    pieces: list[tuple[str, int]] = []
    sent = 0
    for k in range(1, len(token_ids) + 1):
        text = decode(token_ids[:k])
        if len(text) > sent and response.startswith(text):
            pieces.append((text[sent:], k))
            sent = len(text)
    if sent < len(response):
        pieces.append((response[sent:], len(token_ids)))
    return pieces


class Chunks:
    """Server-sent events of one streamed reply, in the `chat.completion.chunk` format.

    The role goes out with the first piece of text (or with the finish of an empty answer), never
    ahead of it as an event of its own: a client times its first token from the first event, and
    an event sent at admission would time nothing but the queue (vLLM's server does the same).
    """

    def __init__(self, request: ChatRequest, model: str):
        self.request = request
        self.model = model
        self.created = int(time.time())
        self.role_sent = False

    def _event(self, delta: dict, finish_reason: str | None, logprobs: list[dict] | None = None) -> str:
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                  "logprobs": {"content": logprobs} if logprobs is not None else None}
        body = {
            "id": self.request.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n"

    def content(self, text: str, logprobs: list[dict] | None = None) -> str:
        """A piece of the answer, with the log-probabilities of the tokens made since the last piece."""
        return self._event({"content": text}, None, logprobs)

    def end(self, result: GenerationResult) -> list[str]:
        """The finishing chunk, the usage chunk when asked for, and [DONE]."""
        events = [self._event({"content": ""} if not self.role_sent else {}, result.finish_reason)]
        if self.request.include_usage:
            body = {"id": self.request.request_id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [], "usage": usage(result)}
            events.append(f"data: {json.dumps(body)}\n\n")
        return events + ["data: [DONE]\n\n"]


def sse_events(request: ChatRequest, model: str, result: GenerationResult,
               deltas: list[tuple[str, int]]) -> list[str]:
    """Server-sent events for a finished answer (the static scheduler's streamed replies)."""
    chunks = Chunks(request, model)
    return [*(chunks.content(piece) for piece, _ in deltas), *chunks.end(result)]


def internal_error(request_id: str) -> ApiError:
    """A failure of ours: the client learns it happened and how to find it in the log, not its details."""
    return ApiError(500, f"the server failed on this request; its log has the details (request {request_id})",
                    "server_error", "internal_error")


def engine_error(error: str, request_id: str) -> ApiError:
    """An engine row error as an API error: prompt problems are the client's, the rest are ours.

    A constrained answer out of tokens before its grammar ended is the client's too (its
    `max_tokens` was too few for what it asked): the engine keeps no half-made JSON to hand back
    with finish_reason "length", so it is a 400 saying so.
    """
    if error.startswith("prompt:"):
        reason = error.removeprefix("prompt:").strip()
        return bad_request(reason, "invalid_response_format" if " does not compile" in reason else "invalid_prompt")
    if error.startswith(INCOMPLETE):
        reason = error.removeprefix("generate:").strip()
        return bad_request(f"{reason}; ask for more max_tokens", "answer_incomplete")
    return ApiError(500, f"generating the answer failed; the server's log has the details (request {request_id})",
                    "server_error", "generation_failed")


def context_error(prompt_tokens: int, max_tokens: int, context: int) -> ApiError:
    """A prompt that, with the answer asked for, does not fit the model's context (vLLM's wording)."""
    return bad_request(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion.", "context_length_exceeded",
    )
