"""One chat request's answer from the engine, whole or streamed as server-sent events.

Plain asyncio around `Engine.submit` / `Engine.cancel`, the same for both schedulers, with no Ray
and no web framework. A streamed reply sends each piece of text as soon as it is final (the
continuous scheduler reports tokens as they come; the static one answers whole, and its pieces
go out at the end); the pieces join to exactly the plain answer. Asked for, a token's
log-probability goes out with the first piece of text released once the token is made (a piece
may carry tokens whose text is still held back), so over a stream each token's comes exactly once
and they are the plain reply's. A client that goes away closes the stream, which cancels the
request in the engine.

Nothing goes to the client before the first piece of text, which carries the role: a client's
time to first token is the model's, not the admission's. A long silence (a long prefill, a full
engine) is filled with an SSE comment every `keepalive_s`, which clients skip, so proxies and
load balancers do not close an idle connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from actors import openai_api as api
from actors import structured
from pipeline.schemas import GenerationRequest, GenerationResult

KEEPALIVE = ": keep-alive\n\n"
KEEPALIVE_S = 15.0
_SILENCE = object()  # no update within the keep-alive interval


async def answer(engine: Any, generation: GenerationRequest) -> GenerationResult:
    """The whole answer; a client that leaves (the task is cancelled) cancels it in the engine."""
    submission = engine.submit(generation)
    try:
        return await asyncio.wrap_future(submission.future)
    finally:
        engine.cancel(submission)  # a no-op once it is done


async def started(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """Run a stream to its first item now, so a request the engine refuses at once is an error
    reply rather than a stream, and a started stream owns its request from here on. `stream`'s
    first item is empty (the engine has the request) and is not sent."""
    first = await stream.__anext__()

    async def rest() -> AsyncIterator[str]:
        try:
            if first:
                yield first
            async for event in stream:
                yield event
        finally:  # closed early (the client left): the stream's own cleanup runs now, not at collection
            await stream.aclose()

    return rest()


async def _next_update(updates: asyncio.Queue, keepalive_s: float) -> Any:
    """The next update, or `_SILENCE` when none came within `keepalive_s` (one waiting already is
    taken at once, so a zero interval never starves the stream). A timer, not a task per token; a
    `get` cut short by it leaves its item in the queue."""
    if not updates.empty():
        return updates.get_nowait()
    try:
        async with asyncio.timeout(keepalive_s):
            return await updates.get()
    except TimeoutError:
        return _SILENCE


async def stream(engine: Any, chat: api.ChatRequest, generation: GenerationRequest, interval_s: float,
                 on_end: Callable[[GenerationResult | None, api.ApiError | None], None],
                 keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[str]:
    """Server-sent events of one reply, after an empty first item (see `started`). `on_end(result,
    error)` is called once when the stream ends (result and error both None when the client left
    first); pieces go out at least `interval_s` apart, those made meanwhile together, and a
    keep-alive comment after every `keepalive_s` in which the engine reported nothing."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue()
    logprobs = generation.params.logprobs is not None

    def on_update(submission) -> None:  # on the engine's loop thread: text that is final, tokens made
        taken = len(submission.answer.token_logprobs) if logprobs else 0
        loop.call_soon_threadsafe(updates.put_nowait, (submission.tracker.stable(), taken))

    def shaped(entries: list[dict] | None, start: int, end: int) -> list[dict] | None:
        return structured.logprob_content(entries[start:end], engine.token_bytes) if logprobs else None

    submission = engine.submit(generation, on_update if engine.streams else None)
    submission.future.add_done_callback(lambda _: loop.call_soon_threadsafe(updates.put_nowait, None))
    if submission.future.done() and submission.future.result().error is not None:
        raise api.engine_error(submission.future.result().error, chat.request_id)
    chunks = api.Chunks(chat, engine.model_name)
    sent, given, result, error = "", 0, None, None  # given: tokens whose log-probabilities went out
    try:
        yield ""
        last = -interval_s
        while (update := await _next_update(updates, keepalive_s)) is not None:
            if update is _SILENCE:
                yield KEEPALIVE
                continue
            if (wait := last + interval_s - loop.time()) > 0:
                await asyncio.sleep(wait)
            while update is not None and not updates.empty():  # pieces that piled up go out as one
                update = updates.get_nowait()
            if update is None:
                break
            text, taken = update
            if len(text) > len(sent) and text.startswith(sent):
                yield chunks.content(text[len(sent):], shaped(submission.answer.token_logprobs, given, taken))
                sent, given, last = text, taken, loop.time()
        result = submission.future.result()
        if result.error is not None:
            error = api.engine_error(result.error, chat.request_id)
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        rest = result.response[len(sent):] if result.response.startswith(sent) else ""
        made = len(result.token_ids)
        if sent or engine.streams:
            pieces = [(rest, made)] if rest else []
        else:
            pieces = api.text_deltas(rest, result.token_ids, engine.decode)
        for piece, through in pieces:
            yield chunks.content(piece, shaped(result.token_logprobs, given, through))
            given = through
        if logprobs and given < made:  # tokens that added no text, such as the end of sequence
            yield chunks.content("", shaped(result.token_logprobs, given, made))
        for event in chunks.end(result):
            yield event
    finally:
        engine.cancel(submission)
        on_end(result, error)
