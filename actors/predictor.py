"""The Ray Data callable class around the engine: prepared rows in, output contract rows out.

One instance lives in each generation actor and loads the model once. Tiles are consumed here
and never reach the output. Under the continuous scheduler several batches are in the actor at
once (Ray Data calls it from several threads), so the engine's step loop always has requests
waiting to join; each call returns as soon as its own rows are answered.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from actors.engine import Engine
from pipeline.answers import AnswerSpec
from pipeline.config import EngineConfig, SamplingParams
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
    `done` (from a resumed run) are not asked again. `answers` constrains each question's answer
    and adds the answer-as-data columns (pipeline/answers.py).
    """

    def __init__(self, engine_cfg: EngineConfig, id_column: str, keep: tuple[str, ...] = (),
                 stats_actor: str | None = None, questions_mode: bool = False, done: frozenset = frozenset(),
                 answers: AnswerSpec = AnswerSpec()):
        self.engine = Engine(engine_cfg)
        self.answers = answers
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
            requests.append(GenerationRequest(prompts[i][k], per_image, image_sizes, self._params(k),
                                              image_digests=digests[i]))
        for pair, result in zip(todo, self.engine.generate(requests) if requests else []):
            results[pair] = result
        if self._stats is not None:
            self._stats.report.remote(self._actor, self.engine.stats())
        return self._table(batch, pairs, prompts, questions, results)

    def _params(self, index: int) -> SamplingParams | None:
        """Question `index`'s request options: the engine's, with the run's constraint and logprobs."""
        constraint = self.answers.for_question(index)
        if constraint is None and self.answers.logprobs is None:
            return None
        return dataclasses.replace(self.engine.default_params(), constraint=constraint, logprobs=self.answers.logprobs,
                                   choice_probs=constraint is not None and constraint.kind == "choice")

    def _table(self, batch: pa.Table, pairs: list[tuple[int, int]], prompts: list, questions: list,
               results: dict) -> pa.Table:
        rows = [results[pair] for pair in pairs]
        answers = self._answer_columns([k for _, k in pairs], rows)  # before the errors: a misfit is one
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
        columns.update(answers)
        if self.questions_mode:
            asked = {"question_index": [k for _, k in pairs], "question": [questions[i][k] for i, k in pairs]}
            columns.update({f.name: pa.array(asked[f.name], f.type) for f in QUESTION_FIELDS})
        columns.update({name: batch.column(name).take(take) for name in self.keep})
        return pa.table(columns)

    def _answer_columns(self, indexes: list[int], rows: list[GenerationResult]) -> dict[str, pa.Array]:
        """answer, choice_probs, logprob and token_logprobs, as the run's AnswerSpec lays them out.

        An answer that does not fit its column (an integer past int64) becomes the row's error,
        its text kept in `response`.
        """
        out: dict[str, pa.Array] = {}
        for f in self.answers.fields():
            if f.name == "answer":
                out["answer"] = _fitted(f.type, [self.answers.value(k, r.response) for k, r in zip(indexes, rows)],
                                        rows)
            elif f.name == "token_logprobs":
                out[f.name] = pa.array([self._token_rows(r.token_logprobs) for r in rows], f.type)
            else:
                out[f.name] = pa.array([getattr(r, f.name) for r in rows], f.type)
        return out

    def _token_rows(self, entries: list[dict] | None) -> list[dict] | None:
        """The engine's per-token entries with each token's text beside its id."""
        if entries is None:
            return None
        ids = sorted({e["token"] for e in entries} | {t["token"] for e in entries for t in e["top"]})
        text = {i: b.decode("utf-8", "replace") for i, b in zip(ids, self.engine.token_bytes(ids))}

        def one(e: dict) -> dict[str, Any]:
            return {"token": text[e["token"]], "token_id": e["token"], "logprob": e["logprob"]}

        return [{**one(e), "top": [one(t) for t in e["top"]]} for e in entries]


def _fitted(typ: pa.DataType, values: list, rows: list[GenerationResult]) -> pa.Array:
    """`values` as an array of `typ`; a value that does not fit is null and its row's error says why."""
    try:
        return pa.array(values, typ)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        kept = []
        for value, row in zip(values, rows):
            try:
                pa.array([value], typ)
                kept.append(value)
            except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
                row.error = f"answer: the answer does not fit its column ({typ}): {exc}"
                kept.append(None)
        return pa.array(kept, typ)
