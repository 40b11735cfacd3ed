"""The Ray Data callable class around the engine: prepared rows in, output contract rows out.

One instance lives in each generation actor and loads the model once. Tiles are consumed here
and never reach the output. Under the continuous scheduler several batches are in the actor at
once (Ray Data calls it from several threads), so the engine's step loop always has requests
waiting to join; each call returns as soon as its own rows are answered.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import ray

from actors.engine import Engine
from pipeline.config import EngineConfig
from pipeline.schemas import (
    OUTPUT_FIELDS,
    PREPARED_FIELDS,
    QUESTION_FIELDS,
    TILES,
    GenerationRequest,
    GenerationResult,
)

log = logging.getLogger(__name__)


def _row_tiles(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Per-row tile arrays out of Ray's tensor extension column."""
    return [tiles for chunk in column.chunks for tiles in chunk.to_numpy()]


def split_images(tiles: np.ndarray, counts: list[int], sizes: list[int]) -> tuple[list[np.ndarray], list[tuple]]:
    """A row's concatenated tiles and flattened sizes back into per-image pieces."""
    bounds = np.cumsum([0, *counts])
    per_image = [tiles[bounds[k] : bounds[k + 1]] for k in range(len(counts))]
    return per_image, [(sizes[2 * k], sizes[2 * k + 1]) for k in range(len(counts))]


def batches_in_flight(cfg: EngineConfig, batch_size: int) -> int:
    """Batches one actor holds at once: enough to fill the loop's running slots and one more
    waiting, so the loop never idles between batches; one under the static scheduler."""
    if cfg.scheduler != "continuous":
        return 1
    return math.ceil(cfg.max_running_requests / batch_size) + 1


class Predictor:
    """Generation stage: one output row per (row, question), every question of a row answered.

    The questions of one image reach the engine together, so it encodes and prefills the image
    once. With `questions_mode` the output carries `question_index` and `question`; pairs in
    `done` (from a resumed run) are not asked again.
    """

    def __init__(self, engine_cfg: EngineConfig, id_column: str, keep: tuple[str, ...] = (),
                 stats_actor: str | None = None, questions_mode: bool = False, done: frozenset = frozenset()):
        self.engine = Engine(engine_cfg)
        self.id_column = id_column
        self.keep = tuple(c for c in keep if c != id_column)
        self.questions_mode = questions_mode
        self.done = done
        self._stats = ray.get_actor(stats_actor) if stats_actor else None
        self._actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else "local"

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(self.id_column).to_pylist()
        prepared = {f.name: batch.column(f.name).to_pylist() for f in PREPARED_FIELDS}
        errors, prompts, questions = prepared["error"], prepared["prompts"], prepared["questions"]
        prompt_errors, counts, sizes = prepared["prompt_errors"], prepared["tile_counts"], prepared["image_sizes"]
        digests = prepared["image_digests"]
        tiles = _row_tiles(batch.column(TILES))
        pairs = [(i, k) for i in range(batch.num_rows) for k in range(len(prompts[i]))
                 if (ids[i], k) not in self.done]
        results = {pair: GenerationResult(error=errors[pair[0]] or prompt_errors[pair[0]][pair[1]]) for pair in pairs}
        todo = [pair for pair in pairs if results[pair].error is None]
        requests = []
        for i, k in todo:
            per_image, image_sizes = split_images(tiles[i], counts[i], sizes[i])
            requests.append(GenerationRequest(prompts[i][k], per_image, image_sizes, image_digests=digests[i]))
        for pair, result in zip(todo, self.engine.generate(requests) if requests else []):
            results[pair] = result
        if self._stats is not None:
            self._stats.report.remote(self._actor, self.engine.stats())
        return self._table(batch, pairs, prompts, questions, results)

    def _table(self, batch: pa.Table, pairs: list[tuple[int, int]], prompts: list, questions: list,
               results: dict) -> pa.Table:
        rows = [results[pair] for pair in pairs]
        values = {
            "prompt": [prompts[i][k] for i, k in pairs],
            "response": [r.response for r in rows],
            "error": [r.error for r in rows],
            "num_input_tokens": [r.num_input_tokens for r in rows],
            "num_output_tokens": [r.num_output_tokens for r in rows],
            "num_image_tokens": [r.num_image_tokens for r in rows],
            "finish_reason": [r.finish_reason for r in rows],
            "model": [self.engine.model_name] * len(rows),
            "generation_ms": [r.generation_ms for r in rows],
        }
        take = pa.array([i for i, _ in pairs], pa.int64())
        columns = {"id": batch.column(self.id_column).take(take)}
        columns.update({f.name: pa.array(values[f.name], f.type) for f in OUTPUT_FIELDS})
        if self.questions_mode:
            asked = {"question_index": [k for _, k in pairs], "question": [questions[i][k] for i, k in pairs]}
            columns.update({f.name: pa.array(asked[f.name], f.type) for f in QUESTION_FIELDS})
        columns.update({name: batch.column(name).take(take) for name in self.keep})
        return pa.table(columns)
