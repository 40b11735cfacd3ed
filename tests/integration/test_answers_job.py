"""Answers as data through the real CLI on a real local Ray: constrained answers equal the
transformers-plus-backend reference token for token, the `answer` column has the schema's Arrow
type, per-question constraints in one run, choice probabilities and token log-probabilities, and
constraints that cannot work stop the job at start."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest
from PIL import Image

from jobs import annotate
from pipeline.answers import Constraint, schema_type
from pipeline.config import DEFAULT_QUESTION
from pipeline.write import read_rows
from tests.helpers import BOUNDED_SCHEMA, noise_image, reference_constrained

SCHEMA = BOUNDED_SCHEMA
CHOICES = ["circle", "circles", "square", "triangle"]  # shared first tokens, and one a prefix of another
REGEX = r"[0-9]{2,3}( cm)?"
MAX_NEW = 100
SIZES = [(64, 64), (300, 80), (40, 190), (90, 33), (120, 120)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("answers")
    (root / "images").mkdir()
    for k, size in enumerate(SIZES):
        noise_image(*size, seed=500 + k).save(root / "images" / f"{k}.png")
    return root


def _main(tiny_model: str, folder: Path, out: str, *flags: str) -> int:
    return annotate.main(["--input", str(folder / "images"), "--output", str(folder / out), "--model", tiny_model,
                          "--max-new-tokens", str(MAX_NEW), "--cpu-workers", "2", *flags])


def _image(folder: Path, row_id: str) -> Image.Image:
    return Image.open(folder / "images" / row_id)


def test_a_schema_gives_a_typed_answer_column_equal_to_the_reference(tiny_model, ray_local, folder, engine,
                                                                     reference):
    schema_file = folder / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    assert _main(tiny_model, folder, "typed", "--json-schema", str(schema_file), "--logprobs", "2") == 0

    table = read_rows(str(folder / "typed"))
    assert table.schema.field("answer").type == schema_type(SCHEMA)
    engine_counts = json.loads((folder / "typed" / "_summary.json").read_text())["engine"]
    assert engine_counts["masked_rows"] > 0 and engine_counts["constraint_compiles"] == 1  # one actor, one schema
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == [f"{k}.png" for k in range(len(SIZES))]
    for row in rows:
        assert row["error"] is None and row["finish_reason"] == "stop", row
        value = json.loads(row["response"])
        jsonschema.validate(value, SCHEMA)
        assert row["answer"] == {**{"tags": None}, **value}  # an absent optional field is null
        tokens = [e["token_id"] for e in row["token_logprobs"]]
        assert tokens == reference_constrained(reference, engine, [_image(folder, row["id"])], row["prompt"],
                                               Constraint.json_schema(SCHEMA), MAX_NEW), row["id"]
        assert all(len(e["top"]) == 2 and e["top"][0]["logprob"] >= e["logprob"] - 1e-9
                   for e in row["token_logprobs"])
        text = [e["token"] for e in row["token_logprobs"] if e["token_id"] not in engine.eos_ids]
        assert "".join(text) == row["response"]
        assert row["logprob"] == pytest.approx(sum(e["logprob"] for e in row["token_logprobs"]), abs=1e-6)


def test_each_question_its_own_constraint_in_one_run(tiny_model, ray_local, folder, engine, reference):
    questions = folder / "questions.json"
    questions.write_text(json.dumps([
        {"question": "Which shape is it?", "choices": CHOICES},
        {"question": "Describe it.", "json_schema": SCHEMA},
        {"question": "How long is it?", "regex": REGEX},
        DEFAULT_QUESTION,
    ]))
    assert _main(tiny_model, folder, "mixed", "--questions-file", str(questions)) == 0

    table = read_rows(str(folder / "mixed"))
    assert table.schema.field("answer").type == pa.string()
    assert table.schema.field("choice_probs").type == pa.map_(pa.string(), pa.float64())
    assert "token_logprobs" not in table.column_names
    rows = table.to_pylist()
    assert len(rows) == 4 * len(SIZES) and all(r["error"] is None for r in rows)
    for row in rows:
        k = row["question_index"]
        probs = row["choice_probs"]
        assert (probs is not None) == (k == 0)
        if k == 3:
            assert row["answer"] is None and row["response"] is not None  # a free question has no answer value
            continue
        value = json.loads(row["answer"])  # the answer as JSON text, whatever the question asked
        if k == 0:
            probs = dict(probs)
            assert value == row["response"] == max(probs, key=probs.get)
            assert sorted(probs) == sorted(CHOICES) and sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
        elif k == 1:
            jsonschema.validate(value, SCHEMA)
            assert value == json.loads(row["response"])
        else:
            assert value == row["response"]
            constraint = Constraint("regex", REGEX)
            expected = reference_constrained(reference, engine, [_image(folder, row["id"])], row["prompt"],
                                             constraint, MAX_NEW)
            assert row["response"] == engine.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("flags, reason", [
    (["--regex", "[a-"], "the regex does not compile: "),
    (["--json-schema", '{"type": "object", "properties": {"a": {"type": "nonsense"}}}'], "does not compile"),
    (["--json-schema", '{"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}'],
     "'anyOf' of different types at the schema.a"),
    (["--choices", "a,b", "--regex", "x"], "not allowed with argument"),
])
def test_a_constraint_that_cannot_work_stops_the_job_at_start(tiny_model, folder, capsys, flags, reason):
    with pytest.raises(SystemExit) as stopped:
        _main(tiny_model, folder, "refused", *flags)
    assert stopped.value.code == 2
    assert reason in capsys.readouterr().err
    assert not (folder / "refused").exists()
