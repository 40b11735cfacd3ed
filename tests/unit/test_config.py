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
