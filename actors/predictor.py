"""The Ray Data callable class around the engine: prepared rows in, output contract rows out.

One instance lives in each generation actor and loads the model once. Tiles are consumed here
and never reach the output.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from actors.engine import Engine
from pipeline.config import EngineConfig
from pipeline.schemas import OUTPUT_FIELDS, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


def _row_tiles(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Per-row tile arrays out of Ray's tensor extension column."""
    return [tiles for chunk in column.chunks for tiles in chunk.to_numpy()]


def split_images(tiles: np.ndarray, counts: list[int], sizes: list[int]) -> tuple[list[np.ndarray], list[tuple]]:
    """A row's concatenated tiles and flattened sizes back into per-image pieces."""
    bounds = np.cumsum([0, *counts])
    per_image = [tiles[bounds[k] : bounds[k + 1]] for k in range(len(counts))]
    return per_image, [(sizes[2 * k], sizes[2 * k + 1]) for k in range(len(counts))]


class Predictor:
    """Generation stage: answers every row that reached it without an error, in one engine call."""

    def __init__(self, engine_cfg: EngineConfig, id_column: str, keep: tuple[str, ...] = ()):
        self.engine = Engine(engine_cfg)
        self.id_column = id_column
        self.keep = tuple(c for c in keep if c != id_column)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        prompts = batch.column("prompt").to_pylist()
        tiles = _row_tiles(batch.column("tiles"))
        counts = batch.column("tile_counts").to_pylist()
        sizes = batch.column("image_sizes").to_pylist()
        results = [GenerationResult(error=e) for e in errors]
        todo = [i for i, e in enumerate(errors) if e is None]
        requests = []
        for i in todo:
            per_image, image_sizes = split_images(tiles[i], counts[i], sizes[i])
            requests.append(GenerationRequest(prompts[i], per_image, image_sizes))
        for i, result in zip(todo, self.engine.generate(requests) if requests else []):
            results[i] = result
        return self._table(batch, prompts, results)

    def _table(self, batch: pa.Table, prompts: list[str], results: list[GenerationResult]) -> pa.Table:
        values = {
            "prompt": prompts,
            "response": [r.response for r in results],
            "error": [r.error for r in results],
            "num_input_tokens": [r.num_input_tokens for r in results],
            "num_output_tokens": [r.num_output_tokens for r in results],
            "num_image_tokens": [r.num_image_tokens for r in results],
            "finish_reason": [r.finish_reason for r in results],
            "model": [self.engine.model_name] * len(results),
            "generation_ms": [r.generation_ms for r in results],
        }
        columns = {"id": batch.column(self.id_column)}
        columns.update({f.name: pa.array(values[f.name], f.type) for f in OUTPUT_FIELDS})
        columns.update({name: batch.column(name) for name in self.keep})
        return pa.table(columns)
