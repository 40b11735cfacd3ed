"""Row contracts: what each stage reads and writes, in one place.

The engine speaks `GenerationRequest` -> `GenerationResult`; the Ray Data stages speak columns,
listed per stage below, so a reader can follow a row from the manifest to the output file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.config import SamplingParams

# Input (read, pipeline/inputs.py): the id column (any name, --id-column), the image column
# (`image`/`images` or --image-column), optional `prompt`, questions and status columns, and any
# columns named in --keep-columns.
# CPU stage (preprocess.prepare_batch) adds these, one row per input row: the questions the row
# asks and their formatted prompts (and per-question prompt errors), the row's error, its images'
# tiles; image sizes are flattened (h1, w1, h2, w2, ...), and each image's digest names its tiles
# and size (the engine's image cache key).
# `tiles` holds one `(n, 3, crop, crop)` uint8 array per row, in Ray Data's variable-shaped tensor
# type (its Arrow type is Ray's, so it is named here and typed by the stage).
TILES = "tiles"
PREPARED_FIELDS = [
    pa.field("prompts", pa.list_(pa.string())),
    pa.field("questions", pa.list_(pa.string())),
    pa.field("prompt_errors", pa.list_(pa.string())),
    pa.field("error", pa.string()),
    pa.field("tile_counts", pa.list_(pa.int32())),
    pa.field("image_sizes", pa.list_(pa.int32())),
    pa.field("image_digests", pa.list_(pa.string())),
]
PREPARED_COLUMNS = (*(f.name for f in PREPARED_FIELDS), TILES)

# Generation stage (predictor) writes the output contract: the id, these, then the kept columns.
OUTPUT_FIELDS = [
    pa.field("prompt", pa.string()),
    pa.field("response", pa.string()),
    pa.field("error", pa.string()),
    pa.field("num_input_tokens", pa.int32()),
    pa.field("num_output_tokens", pa.int32()),
    pa.field("num_image_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("model", pa.string()),
    pa.field("generation_ms", pa.float64()),
]
OUTPUT_COLUMNS = tuple(f.name for f in OUTPUT_FIELDS)
# Then the answer-as-data columns of the run's AnswerSpec (pipeline/answers.py `fields`): `logprob`
# always, `answer` and `choice_probs` under constraints, `token_logprobs` with --logprobs.
# With several questions per image, each output row also says which question it answers.
QUESTION_FIELDS = [pa.field("question_index", pa.int32()), pa.field("question", pa.string())]


@dataclass
class GenerationRequest:
    """One prompt for the engine: formatted text with one `<image>` per image, and uint8 tiles.

    `tiles[i]` is `(num_tiles, 3, crop, crop)` uint8 for image i and `image_sizes[i]` its
    upright (height, width); rows may differ in image and tile counts. `image_digests[i]`
    (optional; computed by the engine when missing) names image i's tiles and size, so the
    engine encodes an image once however many requests show it. `prompt_ids` (optional) are the
    prompt already tokenised, one image token per image (the endpoint tokenises off its event loop).
    """

    prompt: str
    tiles: list[np.ndarray] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    params: SamplingParams | None = None
    image_digests: list[str] | None = None
    prompt_ids: list[int] | None = None


@dataclass
class GenerationResult:
    """What the engine says about one request; `error` is set (and `response` None) on failure.

    `generation_ms` is the request's time in the engine (under the static scheduler: the wall
    time of the batched `generate` call that produced it); `first_token_ms` when its first token
    came (continuous scheduler only). `logprob` is the answer's log-probability under the model
    (each token's log-softmax of the raw logits, before temperature and masks, summed);
    `token_logprobs` (when asked for) holds per token `{"token", "logprob", "top": [{"token",
    "logprob"}]}` with token ids; `choice_probs` (when asked for) each choice's probability as
    the whole answer, normalised over the choices.
    """

    response: str | None = None
    error: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_image_tokens: int = 0
    finish_reason: str | None = None
    generation_ms: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    first_token_ms: float = 0.0
    logprob: float | None = None
    token_logprobs: list[dict] | None = None
    choice_probs: dict[str, float] | None = None
