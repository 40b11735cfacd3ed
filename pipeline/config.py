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


DEFAULT_QUESTION = "What is shown in this image?"


@dataclass(frozen=True)
class AnnotateConfig:
    """One batch annotation run: where rows come from and go, and how the plan is sized.

    `resume` continues an interrupted run and `retry_errors` re-runs the failed rows of a
    finished one; both skip ids already answered and replace the rows that carried an error.

    `actors` is (min, max) generation actors; None means one per GPU of the cluster (or one on
    a CPU-only cluster). `gpus_per_actor` None means 1 when the cluster has GPUs, else 0.
    """

    input: str
    output: str
    engine: EngineConfig
    prompt: str = DEFAULT_QUESTION
    id_column: str = "id"
    keep_columns: tuple[str, ...] = ()
    limit: int | None = None
    overwrite: bool = False
    resume: bool = False
    retry_errors: bool = False
    batch_size: int = 8
    preprocess_batch_size: int = 16
    rows_per_file: int = 1000
    actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpu_workers: int | None = None
    fetch_timeout_s: float = 10.0
    fetch_threads: int = 16
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("--input and --output are required")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ConfigError("--output must differ from --input")
        for name in ("batch_size", "preprocess_batch_size", "rows_per_file", "fetch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.overwrite and (self.resume or self.retry_errors):
            raise ConfigError("--overwrite discards the output that --resume/--retry-errors continue")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        if self.actors is not None and not 1 <= self.actors[0] <= self.actors[1]:
            raise ConfigError("--actors must be N or MIN-MAX with 1 <= MIN <= MAX")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("--gpus-per-actor must be >= 0")
        if self.cpu_workers is not None and self.cpu_workers < 1:
            raise ConfigError("--cpu-workers must be at least 1")
        if self.fetch_timeout_s <= 0:
            raise ConfigError("--fetch-timeout must be positive")
        reserved = {"prompt", "response", "error", "tiles", "image", "images"}
        if reserved & set(self.keep_columns):
            raise ConfigError(f"--keep-columns cannot name {sorted(reserved & set(self.keep_columns))}")


def parse_actors(text: str) -> tuple[int, int]:
    """`N` or `MIN-MAX` into a (min, max) pair."""
    try:
        low, _, high = text.partition("-")
        pair = (int(low), int(high or low))
    except ValueError:
        raise ConfigError(f"--actors must be N or MIN-MAX, got {text!r}") from None
    return pair
