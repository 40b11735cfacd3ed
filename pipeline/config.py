"""Typed configuration, validated on construction, in one place for every entrypoint.

Each entrypoint builds one of these dataclasses from its flags; the object is logged at start-up
and saved next to the output, so every result says how it was made.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.answers import MAX_TOP_LOGPROBS, AnswerSpec, Constraint
from pipeline.errors import ConfigError

PROMPT_FORMATS = ("auto", "mistral", "vicuna", "34b", "raw")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
QUANTIZATIONS = ("none", "8bit", "4bit")
SCHEDULERS = ("continuous", "static")


DEFAULT_MAX_NEW_TOKENS = 128
GREEDY_BELOW = 1e-5  # as vLLM: a temperature this small is greedy decoding


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
    """How the generation engine loads a checkpoint, schedules and decodes.

    `temperature == 0` means greedy decoding; `seed` makes sampling repeatable. `scheduler`
    `continuous` steps every running request together token by token (requests join and leave
    at any step); `static` runs whole left-padded batches through `generate`. The continuous
    loop's memory: `kv_cache_mb` of KV cache, one slot per running request and a quarter more for
    stored prefixes (None: 80 % of free GPU memory; on CPU room for every running request at up to
    1,024 tokens), and `image_cache_mb` of encoded images; `max_batch_tokens` tokens per step
    (None: 1024 on CPU, 8192 on GPU) for at most `max_running_requests` requests, prompt chunks of
    at least `page_size` tokens; `vision_batch_tiles` tiles per vision-tower call. `cpu_threads`:
    torch threads when the engine computes on CPU (None: as many as its process was given; the
    batch job sets it for CPU actors, see `jobs.plan.plan_resources`).
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    quantization: str = "none"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    prompt_format: str = "auto"
    scheduler: str = "continuous"
    kv_cache_mb: float | None = None
    image_cache_mb: float = 256.0
    page_size: int = 32
    max_batch_tokens: int | None = None
    max_running_requests: int = 32
    vision_batch_tiles: int = 64
    cpu_threads: int | None = None

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
        if self.top_k < 0:
            raise ConfigError("top_k must be >= 0 (0 keeps every token)")
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        if self.kv_cache_mb is not None and self.kv_cache_mb <= 0:
            raise ConfigError("kv_cache_mb must be positive (or unset for automatic sizing)")
        if self.image_cache_mb <= 0:
            raise ConfigError("image_cache_mb must be positive")
        if self.page_size < 4:
            raise ConfigError("page_size must be at least 4 tokens")
        if self.max_batch_tokens is not None and self.max_batch_tokens < self.page_size:
            raise ConfigError("max_batch_tokens must be at least page_size")
        if self.max_running_requests < 1 or self.vision_batch_tiles < 1:
            raise ConfigError("max_running_requests and vision_batch_tiles must be at least 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError("cpu_threads must be at least 1 (or unset)")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding options; under the static scheduler rows with equal params share a batch.

    A temperature below `GREEDY_BELOW` is greedy: dividing logits by it overflows to infinities
    (1e-40 gave empty answers), and no distribution that sharp differs from the argmax.
    `constraint` restricts the answer (see `Constraint`); `logprobs` asks for each generated
    token's log-probability and its `logprobs` best alternatives (0: the token's alone; None: none);
    `choice_probs` asks, for a `choice` constraint, every choice's probability as the whole answer.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    top_k: int = 0
    constraint: Constraint | None = None
    logprobs: int | None = None
    choice_probs: bool = False

    def __post_init__(self) -> None:
        if 0 < self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.choice_probs and (self.constraint is None or self.constraint.kind != "choice"):
            raise ConfigError("choice probabilities need a choice constraint")

    @classmethod
    def from_engine(cls, cfg: EngineConfig) -> "SamplingParams":
        return cls(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed, top_k=cfg.top_k)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready view of a config dataclass (nested dataclasses included)."""
    return dataclasses.asdict(cfg)


DEFAULT_QUESTION = "What is shown in this image?"
# The `input` of a run on a caller's own Ray Dataset (jobs.annotate.annotate), which has no paths.
DATASET_INPUT = "<ray.data.Dataset>"


@dataclass(frozen=True)
class AnnotateConfig:
    """One batch annotation run: where rows come from and go, and how the plan is sized.

    `resume` continues an interrupted run and `retry_errors` re-runs the failed rows of a
    finished one; both skip ids already answered and replace the rows that carried an error.

    `actors` is (min, max) generation actors; None means one per GPU of the cluster (or one on
    a CPU-only cluster). `gpus_per_actor` None means 1 when the cluster has GPUs, else 0.

    `questions` (from --questions-file) or `questions_column` (a manifest column of lists) ask
    several questions of each image: one output row per (id, question_index). `answers` says how
    answers are constrained and typed (pipeline/answers.py).
    """

    input: str
    output: str
    engine: EngineConfig
    prompt: str = DEFAULT_QUESTION
    input_format: str = "auto"
    id_column: str = "id"
    image_column: str | None = None
    questions: tuple[str, ...] = ()
    questions_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    limit: int | None = None
    overwrite: bool = False
    resume: bool = False
    retry_errors: bool = False
    force_config: bool = False
    batch_size: int = 8
    preprocess_batch_size: int = 16
    rows_per_file: int = 1000
    actors: tuple[int, int] | None = None
    gpus_per_actor: float | None = None
    cpu_workers: int | None = None
    fetch_timeout_s: float = 10.0
    fetch_threads: int = 16
    limits: ImageLimits = field(default_factory=ImageLimits)
    fast_decode: bool = False
    dedupe: str = "none"
    answers: AnswerSpec = field(default_factory=AnswerSpec)

    def __post_init__(self) -> None:
        if self.input == DATASET_INPUT:
            self._check_options()
            return
        if not self.input or not self.output:
            raise ConfigError("--input and --output are required")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ConfigError("--output must differ from --input")
        fixed = _fixed_part(self.input)
        if _inside(fixed, self.output) or (fixed != self.input and _same(fixed, self.output)):
            raise ConfigError(
                f"--input {self.input} lies inside --output {self.output}: --overwrite would delete it and --resume "
                "would read it as results; write the output elsewhere"
            )
        if _reads_output(self.input, self.output):
            raise ConfigError(
                f"--output {self.output} lies inside --input {self.input}: the next run would read its files as "
                "input; write the output elsewhere"
            )
        self._check_options()

    def _check_options(self) -> None:
        """Everything but the paths: what a caller's own Dataset is checked for too."""
        _check_choice("--dedupe", self.dedupe, DEDUPE_MODES)
        _check_choice("--input-format", self.input_format, INPUT_FORMATS)
        if self.questions and self.questions_column:
            raise ConfigError("give --questions-file or --questions-column, not both")
        if any(not q.strip() for q in self.questions):
            raise ConfigError("--questions-file holds an empty question")
        if self.answers.per_question and len(self.answers.per_question) != len(self.questions):
            raise ConfigError("per-question constraints need one entry per question of --questions-file")
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
        reserved = set(RESERVED_COLUMNS) | {"image", "images"}
        clash = sorted(reserved & set(self.keep_columns))
        if clash:
            raise ConfigError(
                f"--keep-columns cannot name {clash}: the output (or the CPU stage) already has columns of that "
                "name; rename them in the input or leave them out"
            )

    @property
    def asks_questions(self) -> bool:
        return bool(self.questions or self.questions_column)


# Every column the output or the CPU stage writes, which a kept input column would collide with.
RESERVED_COLUMNS = (
    "id", "prompt", "response", "error", "num_input_tokens", "num_output_tokens", "num_image_tokens",
    "finish_reason", "model", "generation_ms", "question", "question_index",
    "answer", "choice_probs", "logprob", "token_logprobs",
    "prompts", "questions", "tiles", "tile_counts", "image_sizes", "image_digests",
)
INPUT_FORMATS = ("auto", "parquet", "images", "webdataset")
DEDUPE_MODES = ("none", "first")
# Configuration keys that change answers: a resumed or retried run must keep them.
ANSWER_KEYS = ("prompt", "questions", "questions_column", "engine.model", "engine.prompt_format",
               "engine.max_new_tokens", "engine.temperature", "engine.top_p", "engine.top_k", "engine.seed",
               "engine.dtype", "engine.quantization", "answers")


def _fixed_part(path: str) -> str:
    """A glob's folder before its first wildcard (the path itself when it has none)."""
    cut = min((i for i in (path.find(c) for c in "*?[") if i >= 0), default=-1)
    return path if cut < 0 else path[:cut].rsplit("/", 1)[0]


def _same(a: str, b: str) -> bool:
    if "://" not in a and "://" not in b:
        a, b = os.path.abspath(a), os.path.abspath(b)
    return a.rstrip("/") == b.rstrip("/")


def _reads_output(input_uri: str, output: str) -> bool:
    """Whether reading the input would find the output's files: an output under an input folder,
    or where a glob's pattern matches the files written into it."""
    if fixed_part := _fixed_part(input_uri) if any(c in input_uri for c in "*?[") else None:
        if "**" in input_uri:
            return _same(output, fixed_part) or _inside(output, fixed_part)
        return fnmatch.fnmatchcase(f"{output.rstrip('/')}/0.parquet", input_uri) and (
            output.rstrip("/").count("/") == input_uri.count("/") - 1)
    return _inside(output, input_uri)


def _inside(path: str, root: str) -> bool:
    """True when `path` is strictly under `root` (both local paths, or both URIs)."""
    if "://" not in path and "://" not in root:
        path, root = os.path.abspath(path), os.path.abspath(root)
    root = root.rstrip("/") + "/"
    return path.rstrip("/").startswith(root) and path.rstrip("/") + "/" != root


def answer_config_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The answer-changing keys (see ANSWER_KEYS) whose values differ between two saved configs.

    A config saved before `answers` existed was made with none, so it continues a run without any."""

    def get(cfg: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return list(cfg) if isinstance(cfg, tuple) else cfg

    previous = {"answers": json.loads(json.dumps(to_dict(AnswerSpec()))), **previous}
    return [k for k in ANSWER_KEYS if get(previous, k) != get(current, k)]


def parse_actors(text: str) -> tuple[int, int]:
    """`N` or `MIN-MAX` into a (min, max) pair."""
    try:
        low, _, high = text.partition("-")
        pair = (int(low), int(high or low))
    except ValueError:
        raise ConfigError(f"--actors must be N or MIN-MAX, got {text!r}") from None
    return pair


# Engine options as command-line flags, in one table: (field, flag, help). Types, choices and
# defaults come from `EngineConfig` itself, so both CLIs (annotate, serve) say the same thing.
ENGINE_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("prompt_format", "--prompt-format", "prompt layout"),
    ("max_new_tokens", "--max-new-tokens", "answer length limit in tokens"),
    ("temperature", "--temperature", "0 = greedy decoding"),
    ("top_p", "--top-p", "nucleus sampling mass when temperature > 0"),
    ("top_k", "--top-k", "sample among the k best tokens (0: all)"),
    ("seed", "--seed", "sampling seed"),
    ("dtype", "--dtype", "auto = bfloat16 on GPU, float32 on CPU"),
    ("attn_implementation", "--attn", "attention implementation"),
    ("quantization", "--quantization", "bitsandbytes weight quantization"),
    ("scheduler", "--scheduler", "continuous: requests join and leave the running batch at every token step; "
                                 "static: whole batches through generate"),
    ("kv_cache_mb", "--kv-cache-mb", "KV cache per engine: a slot per running request, a quarter more for stored "
                                     "prefixes (unset: 80%% of free GPU memory; on CPU room for every running "
                                     "request at up to 1,024 tokens)"),
    ("image_cache_mb", "--image-cache-mb", "encoded images kept per engine, so a repeated image is encoded once"),
    ("max_running_requests", "--max-running-requests", "requests stepped together"),
    ("max_batch_tokens", "--max-batch-tokens", "tokens per model step (unset: 1024 on CPU, 8192 on GPU)"),
    ("page_size", "--page-size", "the smallest prompt chunk of a step, in tokens (and the floor the step's "
                                 "tokens are halved to after out of memory)"),
    ("vision_batch_tiles", "--vision-batch-tiles", "image tiles per vision-tower call"),
    ("cpu_threads", "--cpu-threads", "torch threads of an engine on CPU (unset: a batch job's CPU actor takes its "
                                     "share of the node's cores; the endpoint's replica, the CPUs it reserves)"),
)
_CHOICES = {"prompt_format": PROMPT_FORMATS, "dtype": DTYPES, "attn_implementation": ATTN_IMPLEMENTATIONS,
            "quantization": QUANTIZATIONS, "scheduler": SCHEDULERS}


def add_engine_arguments(parser: Any) -> None:
    """Add one flag per engine option (see ENGINE_FLAGS) to an argparse parser or group."""
    hints = typing.get_type_hints(EngineConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for name, flag, text in ENGINE_FLAGS:
        kind = next(k for k in (typing.get_args(hints[name]) or (hints[name],)) if k is not type(None))
        default = defaults[name]
        shown = f" (default: {default})" if default is not None else ""
        parser.add_argument(flag, dest=name, type=kind, default=default, choices=_CHOICES.get(name),
                            help=text + shown)


def engine_config_from(args: Any, model: str) -> EngineConfig:
    """The EngineConfig for flags added by `add_engine_arguments`."""
    return EngineConfig(model=model, **{name: getattr(args, name) for name, _, _ in ENGINE_FLAGS})
