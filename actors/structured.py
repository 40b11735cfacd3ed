"""Constrained answers and log-probabilities on the OpenAI endpoint: what a request asks for, how
the replica checks it, and each token's log-probability in OpenAI's shape.

A client asks for a constrained answer the OpenAI way (`response_format`: a JSON schema, or any
JSON object) or vLLM's (`structured_outputs` in the body, which the openai client sends through
`extra_body`: choices, a regex, a JSON schema or a grammar), so clients written for either work
unchanged. Both become one `Constraint`, which the engine enforces token by token
(actors/constraints.py).

The replica compiles a request's constraint before the engine sees it, in a thread and under
`COMPILE_LIMIT_S`: a constraint that does not compile is a 400 that says why, and a hostile one
never holds the event loop that every stream and health check shares. The compile lands in the
engine's cache with a start matcher, so the engine's own `submit`, on the event loop, only copies
it. llguidance's parser limits already keep a compile to milliseconds or a refusal (an enum of
150,000 values is refused after about a second on the tiny checkpoint); the time limit bounds the
client's wait whatever the schema is.

Plain Python with no Ray and no web framework.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from actors.constraints import ConstraintError
from pipeline.config import Constraint, SamplingParams

COMPILE_LIMIT_S = 5.0
REASON_CHARS = 1000  # a compiler's reason can quote the whole grammar back
LOWEST_LOGPROB = -9999.0  # vLLM's stand-in for -inf: JSON has no infinities
ANY_OBJECT = {"type": "object"}
# vLLM's `structured_outputs` keys -> constraint kinds.
STRUCTURED_KINDS = {"json": "json_schema", "choice": "choice", "regex": "regex", "grammar": "grammar",
                    "json_object": "json_schema"}
KIND_NAMES = {"json_schema": "JSON schema", "choice": "choice", "regex": "regex", "grammar": "grammar"}


def constraint_of(body: dict) -> Constraint | None:
    """The constraint a request body asks for, if any (raises ValueError saying what is wrong).

    `response_format` and `structured_outputs` are two ways to ask for one thing: a body that
    constrains its answer through both is refused rather than one of them dropped.
    """
    from_format = _response_format(body["response_format"]) if body.get("response_format") is not None else None
    from_extra = _structured_outputs(body["structured_outputs"]) if body.get("structured_outputs") is not None else None
    if from_format is not None and from_extra is not None:
        raise ValueError("give either 'response_format' or 'structured_outputs', not both")
    return from_format or from_extra


def _response_format(value: Any) -> Constraint | None:
    """OpenAI's `response_format`: text (no constraint), any JSON object, or a named JSON schema."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError("'response_format' must be an object with a 'type'")
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return Constraint.json_schema(ANY_OBJECT)
    if value["type"] != "json_schema":
        raise ValueError(f"'response_format.type' must be text, json_object or json_schema; got {value['type']!r}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError("'response_format.json_schema' must be an object with 'name' and 'schema'")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError("'response_format.json_schema.name' must be a non-empty string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ValueError("'response_format.json_schema.strict' must be a boolean")  # strict or not, it is enforced
    if not isinstance(spec.get("schema"), dict):
        raise ValueError("'response_format.json_schema.schema' must be a JSON schema object")
    return _schema(spec["schema"])


def _structured_outputs(value: Any) -> Constraint:
    """vLLM's `structured_outputs`: exactly one of json, choice, regex, grammar (or json_object)."""
    if not isinstance(value, dict):
        raise ValueError("'structured_outputs' must be an object")
    given = [k for k, v in value.items() if v is not None and v is not False]
    unknown = [k for k in given if k not in STRUCTURED_KINDS]
    if unknown:
        raise ValueError(f"'structured_outputs' options {unknown} are not supported; use one of "
                         f"{', '.join(STRUCTURED_KINDS)}")
    if len(given) != 1:
        raise ValueError(f"'structured_outputs' must give exactly one of {', '.join(STRUCTURED_KINDS)}; got {given}")
    key = given[0]
    option = value[key]
    if key == "json_object":
        if option is not True:
            raise ValueError("'structured_outputs.json_object' must be true")
        return Constraint.json_schema(ANY_OBJECT)
    if key == "json":
        if isinstance(option, str):
            return Constraint("json_schema", option)  # its JSON text, checked to be an object
        if not isinstance(option, dict):
            raise ValueError("'structured_outputs.json' must be a JSON schema (an object or its JSON text)")
        return _schema(option)
    if key == "choice":
        if not isinstance(option, list):
            raise ValueError("'structured_outputs.choice' must be a list of strings")
        return Constraint.choices(option)
    if not isinstance(option, str):
        raise ValueError(f"'structured_outputs.{key}' must be a string")
    return Constraint(STRUCTURED_KINDS[key], option)


def _schema(schema: dict) -> Constraint:
    try:
        return Constraint.json_schema(schema)
    except RecursionError:
        raise ValueError("the JSON schema nests too deeply") from None


async def answer_error(engine: Any, params: SamplingParams, pool: Executor,
                       limit_s: float = COMPILE_LIMIT_S) -> str | None:
    """Why this request's answer cannot be made as asked (None: it can), found in `pool`.

    The checkpoint's grammars are built first and unclocked (once per replica; about a second on
    a large vocabulary): they compile constraints and give log-probabilities their token bytes.
    A constraint then compiles within `limit_s` or is refused; one that runs over goes on in its
    thread and lands in the compile cache, but nobody waits for it.
    """
    if params.constraint is None and params.logprobs is None:
        return None
    loop = asyncio.get_running_loop()
    grammars = await loop.run_in_executor(pool, getattr, engine, "grammars")
    if params.constraint is None:
        return None
    try:
        await asyncio.wait_for(loop.run_in_executor(pool, grammars.grammar, params.constraint), limit_s)
    except ConstraintError as exc:
        return str(exc)[:REASON_CHARS]
    except TimeoutError:
        return f"the {KIND_NAMES[params.constraint.kind]} did not compile within {limit_s:g} s; simplify it"
    return None


def logprob_content(entries: list[dict], token_bytes: Callable[[list[int]], list[bytes]]) -> list[dict]:
    """The engine's per-token log-probabilities (`{"token": id, "logprob", "top": [...]}`) in
    OpenAI's `logprobs.content` shape.

    A token's `bytes` are its own, so the pieces of a character split over tokens join back; its
    `token` is those bytes as text (such a piece shows as U+FFFD), an end-of-sequence its name.
    """
    ids = list(dict.fromkeys(i for e in entries for i in (e["token"], *(t["token"] for t in e["top"]))))
    raw = dict(zip(ids, token_bytes(ids)))

    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": raw[token].decode("utf-8", "replace"), "bytes": list(raw[token]),
                "logprob": logprob if math.isfinite(logprob) else LOWEST_LOGPROB}

    return [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t["token"], t["logprob"]) for t in e["top"]]}
            for e in entries]

