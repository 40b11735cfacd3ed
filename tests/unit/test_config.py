"""Configuration fails at construction with a message that names the bad value."""

import pytest

from pipeline.config import ConfigError, EngineConfig, ImageLimits, SamplingParams, to_dict


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float8"}, "dtype must be one of"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"quantization": "2bit"}, "quantization"),
        ({"prompt_format": "llama3"}, "prompt_format"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"model": ""}, "model"),
        ({"cpu_threads": 0}, "cpu_threads"),
    ],
)
def test_bad_engine_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**{"model": "m", **kwargs})


def test_limits_and_params():
    with pytest.raises(ConfigError):
        ImageLimits(max_pixels=0)
    cfg = EngineConfig(model="m", max_new_tokens=5, temperature=0.5, seed=3)
    assert SamplingParams.from_engine(cfg) == SamplingParams(5, 0.5, 1.0, 3)
    assert to_dict(cfg)["max_new_tokens"] == 5


@pytest.mark.parametrize(
    "input_uri, output_uri, message",
    [
        ("d/in.parquet", "d", "--input d/in.parquet lies inside --output d"),
        ("s3://b/runs/in/*.parquet", "s3://b/runs", "lies inside --output"),
        ("d", "d/out", "--output d/out lies inside --input d"),
        ("d/**/*.parquet", "d/out", "lies inside --input"),
        ("d/*.parquet", "d", "lies inside --output"),  # the glob would read the output's files
        ("d/", "d", "must differ"),
    ],
)
def test_input_and_output_must_not_hold_each_other(input_uri, output_uri, message):
    """--overwrite clears the output and --resume reads it as results, so neither may hold the input."""
    from pipeline.config import AnnotateConfig

    with pytest.raises(ConfigError, match=message):
        AnnotateConfig(input=input_uri, output=output_uri, engine=EngineConfig(model="m"))
    for fine_input, fine_output in (("d/in.parquet", "d2"), ("d/part-*.parquet", "d/out"), ("s3://b/in/", "s3://b/out")):
        AnnotateConfig(input=fine_input, output=fine_output, engine=EngineConfig(model="m"))
