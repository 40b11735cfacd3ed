"""Answers as data: what a question asks for (a constraint on its answer) and the typed column its
answer becomes in the output.

A run's answers are constrained by one `Constraint` (--json-schema, --choices, --regex,
--grammar), or per question by the objects of a questions file. The output's `answer` column is
then the answer as data:

- one JSON schema for every constrained question: the schema's Arrow type (`schema_type`): a
  string or a string enum -> string, integer -> int64, number -> float64, boolean -> bool, array
  -> list, object -> struct (a property not in `required` is nullable);
- choices, regexes and grammars only: the answer's text (the chosen label);
- a mix of a schema with anything else, or of several schemas: the answer as JSON text, so
  `json.loads(answer)` gives every row's value whatever its question asked.

What cannot be one Arrow type (a union of types, a recursive `$ref`, an object with no declared
properties, ...) is refused at start-up, naming the keyword, before any row is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.errors import ConfigError

CONSTRAINT_KINDS = ("json_schema", "choice", "regex", "grammar")
MAX_TOP_LOGPROBS = 20
# The key a questions-file object or a keyword argument names each kind of constraint with.
QUESTION_KEYS = {"json_schema": "json_schema", "choices": "choice", "regex": "regex", "grammar": "grammar"}


@dataclass(frozen=True)
class Constraint:
    """What an answer must be: a JSON schema (`text` is its JSON), one of a list of choices (`text`
    is the JSON list), a regular expression, or a grammar (Lark, or GBNF/EBNF). Hashable, so equal
    constraints share one compiled grammar and one static batch."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ConfigError(f"constraint kind must be one of {', '.join(CONSTRAINT_KINDS)}; got {self.kind!r}")
        if self.kind in ("json_schema", "choice"):
            try:
                value = json.loads(self.text)
            except ValueError as exc:
                raise ConfigError(f"the {self.kind} constraint is not valid JSON: {exc}") from None
            if self.kind == "choice" and (not isinstance(value, list) or not value
                                          or not all(isinstance(c, str) and c for c in value)):
                raise ConfigError("choices must be a non-empty list of non-empty strings")
            if self.kind == "choice" and len(set(value)) != len(value):
                raise ConfigError("choices must not repeat")
            if self.kind == "json_schema" and not isinstance(value, dict):
                raise ConfigError("a JSON schema must be a JSON object")
        elif not self.text:
            raise ConfigError(f"the {self.kind} constraint is empty")

    @classmethod
    def choices(cls, options: list[str]) -> "Constraint":
        return cls("choice", json.dumps(list(options)))

    @classmethod
    def json_schema(cls, schema: dict) -> "Constraint":
        return cls("json_schema", json.dumps(schema))  # key order kept: the answer's fields come in it

    @property
    def options(self) -> list[str]:
        """The choices of a `choice` constraint."""
        return json.loads(self.text) if self.kind == "choice" else []


# ---- JSON schema -> Arrow type ---------------------------------------------------------------

# Keywords that change what a value may be in ways no single Arrow type holds.
UNTYPABLE = ("not", "if", "then", "else", "patternProperties", "dependentSchemas", "prefixItems",
             "unevaluatedProperties", "propertyNames")
SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def schema_type(schema: dict) -> pa.DataType:
    """The Arrow type a JSON schema's values are stored as (raises ConfigError naming what cannot be typed)."""
    typ, _ = _Typer(schema).type_of(schema, "the schema", ())
    return typ


class _Typer:
    """Walks one schema; `$ref`s resolve within it (`#/$defs/...`, `#/definitions/...`)."""

    def __init__(self, root: dict):
        self.root = root

    def type_of(self, node: Any, where: str, refs: tuple[str, ...]) -> tuple[pa.DataType, bool]:
        """(Arrow type, whether null is allowed) of one subschema."""
        if not isinstance(node, dict) or not node:
            raise _refuse(where, "an untyped value (true or {}) has no column type")
        for keyword in UNTYPABLE:
            if keyword in node:
                raise _refuse(where, f"'{keyword}'")
        if "$ref" in node:
            return self._ref(node["$ref"], where, refs)
        if "const" in node:
            return _literal_type([node["const"]], where, "const")
        if "enum" in node:
            return _literal_type(node["enum"], where, "enum")
        for keyword in ("anyOf", "oneOf", "allOf"):
            if keyword in node:
                return self._union(node[keyword], keyword, where, refs)
        kinds = node.get("type")
        if kinds is None:
            kinds = "object" if "properties" in node else "array" if "items" in node else None
        if kinds is None:
            raise _refuse(where, "no 'type'")
        names = [kinds] if isinstance(kinds, str) else list(kinds)
        nullable = "null" in names
        names = [n for n in names if n != "null"]
        if len(names) != 1:
            raise _refuse(where, f"'type': {json.dumps(kinds)} (one type besides null is needed)")
        return self._of_type(names[0], node, where, refs), nullable

    def _of_type(self, name: str, node: dict, where: str, refs: tuple[str, ...]) -> pa.DataType:
        if name in SCALARS:
            return SCALARS[name]
        if name == "array":
            items = node.get("items")
            if not isinstance(items, dict):
                raise _refuse(where, "an array without one 'items' schema")
            return pa.list_(self.type_of(items, f"{where}.items", refs)[0])
        if name == "object":
            properties = node.get("properties")
            if not isinstance(properties, dict) or not properties:
                raise _refuse(where, "an object without 'properties'")
            required = set(node.get("required", ()))
            fields = []
            for key, sub in properties.items():
                typ, nullable = self.type_of(sub, f"{where}.{key}", refs)
                fields.append(pa.field(key, typ, nullable=nullable or key not in required))
            return pa.struct(fields)
        raise _refuse(where, f"'type': {name!r}")

    def _ref(self, ref: Any, where: str, refs: tuple[str, ...]) -> tuple[pa.DataType, bool]:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _refuse(where, f"'$ref': {json.dumps(ref)} (only references inside the schema)")
        if ref in refs:
            raise _refuse(where, f"a recursive '$ref' ({ref})")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        if node is None:
            raise _refuse(where, f"'$ref': {ref} points nowhere")
        return self.type_of(node, where, (*refs, ref))

    def _union(self, options: Any, keyword: str, where: str, refs: tuple[str, ...]) -> tuple[pa.DataType, bool]:
        """anyOf/oneOf of one type (and null), as pydantic writes an Optional; allOf of one schema."""
        if not isinstance(options, list) or not options:
            raise _refuse(where, f"'{keyword}' must be a non-empty list")
        nullable = any(o == {"type": "null"} for o in options)
        rest = [o for o in options if o != {"type": "null"}]
        if keyword == "allOf" and len(options) > 1:
            raise _refuse(where, "'allOf' of several schemas")
        types = [self.type_of(o, f"{where}.{keyword}[{k}]", refs) for k, o in enumerate(rest)]
        if not types or any(t != types[0][0] for t, _ in types):
            raise _refuse(where, f"'{keyword}' of different types")
        return types[0][0], nullable or any(n for _, n in types)


def _literal_type(values: Any, where: str, keyword: str) -> tuple[pa.DataType, bool]:
    """The type of an enum's or a const's values: all strings, all booleans, or all numbers
    (int64 when every one is an integer)."""
    if not isinstance(values, list) or not values:
        raise _refuse(where, f"'{keyword}' must list values")
    types = {_scalar_type(v) for v in values if v is not None}
    if types == {pa.int64(), pa.float64()}:
        types = {pa.float64()}
    if len(types) != 1 or None in types:
        raise _refuse(where, f"'{keyword}' of mixed or non-scalar values")
    return types.pop(), None in values


def _scalar_type(value: Any) -> pa.DataType | None:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    return {float: pa.float64(), str: pa.string()}.get(type(value))


def _refuse(where: str, what: str) -> ConfigError:
    return ConfigError(f"the JSON schema cannot be a typed column: {what} at {where}; give one type per field "
                       "(see the README's 'Answers as data')")


# ---- a run's answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerSpec:
    """How a run's answers are constrained and recorded.

    `constraint` is the run's (every question's that has none of its own); `per_question`, aligned
    with the questions of a questions file, gives a question its own (None: the run's); `logprobs`
    K adds each answer token's log-probability and its K best alternatives (`token_logprobs`).
    """

    constraint: Constraint | None = None
    per_question: tuple[Constraint | None, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"--logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        self.answer_type()  # an untypable schema stops the run here

    def for_question(self, index: int) -> Constraint | None:
        """The constraint of question `index` (0 for a run with one question per row)."""
        own = self.per_question[index] if index < len(self.per_question) else None
        return own or self.constraint

    def constraints(self) -> list[Constraint]:
        """Every distinct constraint some question is asked under, in order."""
        found = [self.constraint, *self.per_question]
        return list(dict.fromkeys(c for c in found if c is not None))

    @property
    def mode(self) -> str:
        """`none` (no answer column), `typed` (one schema's type), `text` or `json` (see the module docstring)."""
        used = self.constraints()
        schemas = [c for c in used if c.kind == "json_schema"]
        if not used:
            return "none"
        if not schemas:
            return "text"
        return "typed" if len(used) == 1 else "json"

    def answer_type(self) -> pa.DataType | None:
        mode = self.mode
        if mode == "typed":
            return schema_type(json.loads(self.constraints()[0].text))
        return None if mode == "none" else pa.string()

    def fields(self) -> list[pa.Field]:
        """The output columns this run adds (after today's): answer, choice_probs, logprob, token_logprobs."""
        fields = []
        if (typ := self.answer_type()) is not None:
            fields.append(pa.field("answer", typ))
        if any(c.kind == "choice" for c in self.constraints()):
            fields.append(pa.field("choice_probs", pa.map_(pa.string(), pa.float64())))
        fields.append(pa.field("logprob", pa.float64()))
        if self.logprobs is not None:
            fields.append(pa.field("token_logprobs", TOKEN_LOGPROBS))
        return fields

    def value(self, index: int, response: str | None) -> Any:
        """The `answer` value of question `index`'s response (raises ValueError on text that does not parse)."""
        constraint = self.for_question(index)
        if response is None or constraint is None:
            return None
        if self.mode == "typed":
            return json.loads(response)
        if self.mode == "json" and constraint.kind != "json_schema":
            return json.dumps(response)
        return response


TOP_LOGPROB = pa.struct([pa.field("token", pa.string()), pa.field("token_id", pa.int32()),
                         pa.field("logprob", pa.float64())])
TOKEN_LOGPROBS = pa.list_(pa.struct([*TOP_LOGPROB, pa.field("top", pa.list_(TOP_LOGPROB))]))


# ---- questions files -----------------------------------------------------------------------------


def read_questions(path: str) -> tuple[tuple[str, ...], tuple[Constraint | None, ...]]:
    """Questions from a file, and each one's own constraint (an empty tuple when none has one).

    The file is one question per non-empty line, or a JSON list whose items are questions or
    objects `{"question": ..., "json_schema" | "choices" | "regex" | "grammar": ...}`.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        questions = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not questions:
            raise ConfigError(f"--questions-file {path} holds no questions")
        return questions, ()
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--questions-file {path} is not a valid JSON list: {exc}") from None
    if not isinstance(items, list):
        raise ConfigError(f"--questions-file {path} must hold a non-empty JSON list")
    return parse_questions(items, f"--questions-file {path}")


def parse_questions(items: list, where: str) -> tuple[tuple[str, ...], tuple[Constraint | None, ...]]:
    """Questions, each a string or an object with its own constraint (see `read_questions`)."""
    if not items:
        raise ConfigError(f"{where} holds no questions")
    parsed = [_question_item(item, f"{where} item {k}") for k, item in enumerate(items)]
    constraints = tuple(c for _, c in parsed)
    return tuple(q for q, _ in parsed), constraints if any(constraints) else ()


def _question_item(item: Any, where: str) -> tuple[str, Constraint | None]:
    if isinstance(item, str):
        return item, None
    if not isinstance(item, dict) or not isinstance(item.get("question"), str):
        raise ConfigError(f"{where} must be a question or an object with a 'question' string")
    unknown = sorted(set(item) - {"question", *QUESTION_KEYS})
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; known: question, {', '.join(QUESTION_KEYS)}")
    given = [k for k in QUESTION_KEYS if k in item]
    if len(given) > 1:
        raise ConfigError(f"{where} gives {' and '.join(given)}; a question takes one constraint")
    if not given:
        return item["question"], None
    return item["question"], constraint_of(QUESTION_KEYS[given[0]], item[given[0]], where)


def constraint_of(kind: str, value: Any, where: str) -> Constraint:
    """A constraint from a JSON value: a schema (an object, or its JSON text), a list of choices, or
    a regex or grammar string."""
    if kind == "json_schema" and isinstance(value, dict):
        return Constraint.json_schema(value)
    if kind == "choice":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: choices must be a list of strings")
        return Constraint.choices(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {kind.replace('_', ' ')} must be {'an object' if kind == 'json_schema' else 'a string'}")
    return Constraint(kind, value)


def constraint_option(options: dict[str, Any]) -> Constraint | None:
    """A constraint from Python keyword arguments: `json_schema=` (a dict or its JSON text),
    `choices=` (a list, or comma-separated text), `regex=` or `grammar=` (text); at most one."""
    given = [k for k in QUESTION_KEYS if options.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of json_schema, choices, regex, grammar; got {', '.join(given)}")
    if not given:
        return None
    value = options[given[0]]
    if given[0] == "choices" and isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    return constraint_of(QUESTION_KEYS[given[0]], value, given[0])
