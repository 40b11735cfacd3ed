"""Answers as data: a schema's Arrow type, refusals that name the keyword, the answer column's mode,
and questions files whose items carry their own constraints."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.answers import TOKEN_LOGPROBS, AnswerSpec, Constraint, read_questions, schema_type
from pipeline.config import AnnotateConfig, ConfigError, EngineConfig, answer_config_changes, to_dict

PYDANTIC_LIKE = {
    "type": "object",
    "$defs": {"Box": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                      "required": ["x", "y"]}},
    "properties": {
        "label": {"enum": ["cat", "dog"]},
        "score": {"type": "number"},
        "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "box": {"$ref": "#/$defs/Box"},
        "size": {"enum": [1, 2, 3]},
        "kind": {"const": "photo"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["label", "score", "ok", "box"],
}


def test_a_schema_becomes_its_arrow_type_with_nullability_from_required():
    typ = schema_type(PYDANTIC_LIKE)
    box = pa.struct([pa.field("x", pa.int64(), nullable=False), pa.field("y", pa.int64(), nullable=False)])
    assert typ == pa.struct([
        pa.field("label", pa.string(), nullable=False), pa.field("score", pa.float64(), nullable=False),
        pa.field("count", pa.int64()), pa.field("ok", pa.bool_(), nullable=False),
        pa.field("tags", pa.list_(pa.string())), pa.field("box", box, nullable=False),
        pa.field("size", pa.int64()), pa.field("kind", pa.string()), pa.field("note", pa.string()),
    ])
    assert [f.nullable for f in typ] == [False, False, True, False, True, False, True, True, True]


@pytest.mark.parametrize("schema, scalar", [
    ({"type": "integer"}, pa.int64()), ({"type": "number"}, pa.float64()), ({"enum": [0.5, 1]}, pa.float64()),
    ({"type": "array", "items": {"type": "boolean"}}, pa.list_(pa.bool_())),
])
def test_scalar_and_list_schemas(schema, scalar):
    assert schema_type(schema) == scalar


@pytest.mark.parametrize("schema, named", [
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
     "'anyOf' of different types at the schema.a"),
    ({"type": "object"}, "an object without 'properties' at the schema"),
    ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}, "'type': [\"string\", \"integer\"]"),
    ({"type": "object", "properties": {"a": {}}}, "untyped value"),
    ({"type": "array"}, "an array without one 'items' schema"),
    ({"type": "object", "properties": {"a": {"enum": ["x", 1]}}}, "'enum' of mixed"),
    ({"type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}, "'not' at the schema.a"),
    ({"$defs": {"N": {"type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"},
     "a recursive '$ref'"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.org/s.json"}}}, "only references inside"),
])
def test_what_cannot_be_one_column_type_is_refused_naming_the_keyword(schema, named):
    with pytest.raises(ConfigError, match="cannot be a typed column") as caught:
        schema_type(schema)
    assert named in str(caught.value)


def test_an_untypable_schema_stops_the_configuration():
    bad = Constraint.json_schema({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"},
                                                                                  {"type": "number"}]}}})
    with pytest.raises(ConfigError, match="'oneOf' of different types"):
        AnnotateConfig(input="in", output="out", engine=EngineConfig(model="m"), answers=AnswerSpec(bad))


def test_the_answer_column_follows_the_constraints_of_the_run():
    schema = Constraint.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    choice = Constraint.choices(["a", "b"])
    regex = Constraint("regex", "[0-9]+")
    assert AnswerSpec().mode == "none" and [f.name for f in AnswerSpec().fields()] == ["logprob"]
    typed = AnswerSpec(schema)
    assert typed.mode == "typed" and typed.answer_type() == pa.struct([pa.field("n", pa.int64())])
    assert typed.value(0, '{"n":3}') == {"n": 3}
    text = AnswerSpec(None, (choice, regex, None), logprobs=2)
    assert text.mode == "text"
    assert [f.name for f in text.fields()] == ["answer", "choice_probs", "logprob", "token_logprobs"]
    assert text.fields()[-1].type == TOKEN_LOGPROBS
    assert (text.value(0, "a"), text.value(1, "12"), text.value(2, "free text")) == ("a", "12", None)
    mixed = AnswerSpec(regex, (schema, choice, None))
    assert mixed.mode == "json" and mixed.answer_type() == pa.string()
    assert [json.loads(mixed.value(k, r)) for k, r in enumerate(['{"n":1}', "b", "77"])] == [{"n": 1}, "b", "77"]
    assert mixed.for_question(2) == regex  # a question without its own takes the run's


def test_questions_file_items_may_carry_their_own_constraint(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([
        "What is it?",
        {"question": "Which shape?", "choices": ["circle", "square"]},
        {"question": "Describe it.", "json_schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
        {"question": "How many?", "regex": "[0-9]"},
    ]))
    questions, constraints = read_questions(str(path))
    assert questions == ("What is it?", "Which shape?", "Describe it.", "How many?")
    assert [c.kind if c else None for c in constraints] == [None, "choice", "json_schema", "regex"]
    assert constraints[1].options == ["circle", "square"]
    plain = tmp_path / "q.txt"
    plain.write_text("One?\n\nTwo?\n")
    assert read_questions(str(plain)) == (("One?", "Two?"), ())


@pytest.mark.parametrize("item, message", [
    ({"question": "Q", "choices": ["a"], "regex": "x"}, "gives choices and regex"),
    ({"question": "Q", "schema": {}}, "unknown key"),
    ({"text": "Q"}, "'question' string"),
    ({"question": "Q", "choices": "a,b"}, "choices must be a list"),
    ({"question": "Q", "choices": ["a", "a"]}, "must not repeat"),
])
def test_a_wrong_questions_file_item_is_refused(tmp_path, item, message):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([item]))
    with pytest.raises(ConfigError, match=message):
        read_questions(str(path))


def test_per_question_constraints_must_match_the_questions():
    with pytest.raises(ConfigError, match="one entry per question"):
        AnnotateConfig(input="in", output="out", engine=EngineConfig(model="m"), questions=("a", "b"),
                       answers=AnswerSpec(None, (Constraint("regex", "x"),)))
    with pytest.raises(ConfigError, match="between 0 and 20"):
        AnswerSpec(logprobs=21)


def test_resume_compares_answer_settings_and_reads_configs_saved_before_them():
    def saved(answers: AnswerSpec) -> dict:
        cfg = AnnotateConfig(input="in", output="out", engine=EngineConfig(model="m"), answers=answers)
        return json.loads(json.dumps(to_dict(cfg)))

    plain, choices = saved(AnswerSpec()), saved(AnswerSpec(Constraint.choices(["a", "b"])))
    assert answer_config_changes(plain, choices) == ["answers"]
    assert answer_config_changes(saved(AnswerSpec(logprobs=1)), plain) == ["answers"]
    older = {k: v for k, v in plain.items() if k != "answers"}
    assert answer_config_changes(older, plain) == []
    assert answer_config_changes(older, choices) == ["answers"]
