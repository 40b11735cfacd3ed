"""The job's options as keyword arguments: the CLI's flags, checked by the same configuration."""

from __future__ import annotations

import pytest

from jobs.options import config_from_args, options_config, parser
from pipeline.answers import Constraint
from pipeline.config import DATASET_INPUT, ConfigError


def test_keyword_options_equal_the_same_flags():
    flags = ["--input", "in", "--output", "out", "--model", "m", "--max-new-tokens", "7", "--scheduler", "static",
             "--keep-columns", "a,b", "--actors", "1-2", "--choices", "x,y", "--logprobs", "2"]
    cli = config_from_args(parser().parse_args(flags))
    api = options_config("m", {"max_new_tokens": 7, "scheduler": "static", "keep_columns": "a,b", "actors": "1-2",
                               "choices": ["x", "y"], "logprobs": 2})
    assert api.input == DATASET_INPUT
    for name in ("engine", "keep_columns", "actors", "answers"):
        assert getattr(api, name) == getattr(cli, name), name


def test_questions_may_carry_constraints_and_limits_apply():
    cfg = options_config("m", {"questions": ["What?", {"question": "Which?", "choices": ["a", "b"]}],
                               "max_image_pixels": 1000})
    assert cfg.questions == ("What?", "Which?")
    assert cfg.answers.per_question == (None, Constraint.choices(["a", "b"]))
    assert cfg.limits.max_pixels == 1000


@pytest.mark.parametrize("options, message", [
    ({"overwrite": True}, "unknown option(s) overwrite"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"regex": "[a-"}, "the regex does not compile"),
    ({"json_schema": {"type": "object"}}, "an object without 'properties'"),
    ({"actors": "2-1"}, "--actors must be N or MIN-MAX"),
])
def test_a_wrong_option_is_refused_with_the_clis_message(options, message):
    with pytest.raises(ConfigError) as caught:
        options_config("m", options)
    assert message in str(caught.value)
