"""Typed configuration, validated on construction, in one place for every entrypoint.

Each entrypoint builds one of these dataclasses from its flags; the object is logged at start-up
and saved next to the output, so every result says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PROMPT_FORMATS = ("auto", "mistral", "vicuna", "34b", "raw")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
QUANTIZATIONS = ("none", "8bit", "4bit")


class ConfigError(ValueError):
    """A configuration value that cannot work; raised at start-up, before any row is read."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one input image, so a hostile or broken file costs a row, never the worker."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ConfigError("image limits must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """How the generation engine loads a checkpoint and decodes.

    `temperature == 0` means greedy decoding; `seed` makes sampling repeatable.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    quantization: str = "none"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    prompt_format: str = "auto"

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must name a checkpoint directory")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding options; rows with equal params share one `generate` call."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_engine(cls, cfg: EngineConfig) -> "SamplingParams":
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready view of a config dataclass (nested dataclasses included)."""
    return dataclasses.asdict(cfg)
