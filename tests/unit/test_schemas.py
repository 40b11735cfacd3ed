"""The row contract is real: what the CPU stage and the generation stage write is what schemas.py
declares, names and types."""

from __future__ import annotations

import pyarrow as pa

from actors.predictor import Predictor
from pipeline.answers import AnswerSpec, Constraint
from pipeline.config import EngineConfig, ImageLimits
from pipeline.preprocess import StageConfig, prepare_batch
from pipeline.schemas import OUTPUT_FIELDS, PREPARED_COLUMNS, PREPARED_FIELDS, QUESTION_FIELDS, TILES
from tests.helpers import encode, noise_image


def _prepared(tiny_model: str, questions: tuple[str, ...] = ()) -> pa.Table:
    manifest = pa.table({"id": ["a", "b"], "image": [encode(noise_image(40, 30)), b"not an image"], "src": ["x", "y"]})
    cfg = StageConfig(model=tiny_model, prompt_format="auto", question="What?", id_column="id", image_column="image",
                      prompt_column=None, keep=("src",), limits=ImageLimits(), questions=questions)
    return prepare_batch(manifest, cfg)


def test_the_cpu_stage_writes_the_declared_columns(tiny_model):
    table = _prepared(tiny_model)
    assert table.column_names == ["id", "src", *PREPARED_COLUMNS]
    for field in PREPARED_FIELDS:
        assert table.schema.field(field.name).type == field.type, field.name
    assert table.column(TILES).type.extension_name == "ray.data.arrow_variable_shaped_tensor"


def test_the_generation_stage_writes_the_output_contract(tiny_model):
    """The output contract, the answer columns of the run (pipeline/answers.py) included."""
    for questions, extra, answers in (
        ((), [], AnswerSpec()),
        (("What?", "Why?"), QUESTION_FIELDS, AnswerSpec(Constraint.choices(["a", "b"]), logprobs=1)),
    ):
        predictor = Predictor(EngineConfig(model=tiny_model, max_new_tokens=2), "id", keep=("src",),
                              questions_mode=bool(questions), answers=answers)
        try:
            out = predictor(_prepared(tiny_model, questions))
        finally:
            predictor.engine.close()
        assert out.schema == pa.schema([pa.field("id", pa.string()), *OUTPUT_FIELDS, *answers.fields(), *extra,
                                        pa.field("src", pa.string())])
        assert out.num_rows == 2 * max(1, len(questions))
