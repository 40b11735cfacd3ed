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


def batches_in_flight(cfg: EngineConfig, batch_size: int) -> int:
    """Batches one actor holds at once: enough to fill the loop's running slots and one more
    waiting, so the loop never idles between batches; one under the static scheduler."""
    if cfg.scheduler != "continuous":
        return 1
    return math.ceil(cfg.max_running_requests / batch_size) + 1


@ray.remote(num_cpus=0)
class EngineStats:
    """Collects the engines' counters of one job: each actor reports its running totals."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}

    def report(self, actor: str, stats: dict[str, int]) -> None:
        self._latest[actor] = stats

    def totals(self) -> dict[str, int]:
        keys = ("requests", "prefill_tokens_submitted", "prefill_tokens_computed", "prefill_tokens_matched",
                "generated_tokens", "image_encodings_requested", "image_encodings_run", "loop_restarts")
        return {k: sum(s.get(k, 0) for s in self._latest.values()) for k in keys}


class Predictor:
    """Generation stage: answers every row that reached it without an error."""

    def __init__(self, engine_cfg: EngineConfig, id_column: str, keep: tuple[str, ...] = (),
                 stats_actor: str | None = None):
        self.engine = Engine(engine_cfg)
        self.id_column = id_column
        self.keep = tuple(c for c in keep if c != id_column)
        self._stats = ray.get_actor(stats_actor) if stats_actor else None
        self._actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else "local"

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch.column("error").to_pylist()
        prompts = batch.column("prompt").to_pylist()
        tiles = _row_tiles(batch.column("tiles"))
        counts = batch.column("tile_counts").to_pylist()
        sizes = batch.column("image_sizes").to_pylist()
        digests = batch.column("image_digests").to_pylist()
        results = [GenerationResult(error=e) for e in errors]
        todo = [i for i, e in enumerate(errors) if e is None]
        requests = []
        for i in todo:
            per_image, image_sizes = split_images(tiles[i], counts[i], sizes[i])
            requests.append(GenerationRequest(prompts[i], per_image, image_sizes, image_digests=digests[i]))
        for i, result in zip(todo, self.engine.generate(requests) if requests else []):
            results[i] = result
        if self._stats is not None and self.engine.loop is not None:
            self._stats.report.remote(self._actor, self.engine.stats())
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
