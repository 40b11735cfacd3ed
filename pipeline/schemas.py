"""Row contracts: what each stage reads and writes, in one place.

The engine speaks `GenerationRequest` -> `GenerationResult`; the Ray Data stages speak columns,
listed per stage below, so a reader can follow a row from the manifest to the output file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.config import SamplingParams


@dataclass
class GenerationRequest:
    """One prompt for the engine: formatted text with one `<image>` per image, and uint8 tiles.

    `tiles[i]` is `(num_tiles, 3, crop, crop)` uint8 for image i and `image_sizes[i]` its
    upright (height, width); rows may differ in image and tile counts.
    """

    prompt: str
    tiles: list[np.ndarray] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    params: SamplingParams | None = None


@dataclass
class GenerationResult:
    """What the engine says about one request; `error` is set (and `response` None) on failure.

    `generation_ms` is the wall time of the batched `generate` call that produced the row.
    """

    response: str | None = None
    error: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_image_tokens: int = 0
    finish_reason: str | None = None
    generation_ms: float = 0.0
    token_ids: list[int] = field(default_factory=list)
