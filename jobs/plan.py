"""Assemble the Ray Data plan: read -> CPU anyres + prompts -> generation actors -> (write).

It joins the data side (pipeline/) and the model side (actors/), so it lives here, above both.
Sizing decisions live here, made from the configuration and the cluster's resources, and are
logged so a user can see why the plan is shaped the way it is.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from actors.predictor import Predictor, batches_in_flight
from pipeline.config import AnnotateConfig
from pipeline.inputs import InputSpec, read_input
from pipeline.preprocess import StageConfig, prepare_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """How the generation stage is placed on the cluster."""

    actors: tuple[int, int]
    gpus_per_actor: float
    cpus_per_actor: float
    cpu_threads: int | None = None


def cpu_share(cfg: AnnotateConfig, cluster: dict[str, float], node_cpus: float, actors: int) -> int | None:
    """Torch threads of a CPU generation actor: its share of a node's cores (None: the engine's own).

    The actor reserves one CPU, so the CPU stage always finds room (reserving more can leave it
    none on a small node, and the job would wait forever), but it computes with its share: the
    CPU stage's work is short next to generation's and is done early, after which a one-thread
    engine left the other cores idle (a 120-row job on 2 cores: 39.8 s with one thread, 32.8 s
    with two). While both run they share the cores."""
    if cfg.engine.cpu_threads is not None:
        return cfg.engine.cpu_threads
    total = cluster.get("CPU", 0)
    return max(1, int(min(node_cpus or total, total // max(1, actors))))


def plan_resources(cfg: AnnotateConfig, cluster: dict[str, float], node_cpus: float = 0) -> Resources:
    """One GPU per actor and one actor per GPU by default; a CPU-only cluster gets CPU actors,
    each computing with its share of the cores (see `cpu_share`; `node_cpus`: the largest node's)."""
    gpus = int(cluster.get("GPU", 0))
    gpus_per_actor = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_per_actor == 0:
        log.info("no GPU requested or found in the cluster: generation actors run on CPU")
    if cfg.actors is not None:
        actors = cfg.actors
    else:
        count = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1
        actors = (count, count)
    threads = None if gpus_per_actor else cpu_share(cfg, cluster, node_cpus, actors[1])
    return Resources(actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=1.0, cpu_threads=threads)


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node (an actor's threads stay on one node)."""
    import ray

    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)


def stage_config(cfg: AnnotateConfig, spec: InputSpec) -> StageConfig:
    columns = spec.columns
    return StageConfig(
        model=cfg.engine.model,
        prompt_format=cfg.engine.prompt_format,
        question=cfg.prompt,
        id_column=columns.id,
        image_column=columns.image,
        prompt_column=columns.prompt,
        keep=columns.keep,
        limits=cfg.limits,
        fetch_timeout_s=cfg.fetch_timeout_s,
        fetch_threads=cfg.fetch_threads,
        multi_image=columns.multi,
        status_column=spec.status_column,
        read_error_column=spec.read_error_column,
        questions=cfg.questions,
        questions_column=columns.questions,
        fast_decode=cfg.fast_decode,
    )


def preprocess_memory(cfg: AnnotateConfig) -> int:
    """Bytes one preprocessing task reserves: the decode peak of one image at the pixel limit."""
    return 4 * cfg.limits.max_pixels + 256 * 1024 * 1024


def drop_done(batch: pa.Table, id_column: str, done: pa.Array) -> pa.Table:
    """Resume stage: leave out rows whose id the output already answers (every question of it)."""
    return batch.filter(pc.invert(pc.is_in(batch.column(id_column), value_set=done)))


def finished_ids(cfg: AnnotateConfig, done_ids: list, done_pairs: list) -> list:
    """Ids nothing is left to do for: answered ids, or with a fixed list of questions, ids whose
    every question is answered (a questions column can differ per row, so there the rows are read
    again and only their open questions asked)."""
    if not cfg.asks_questions:
        return done_ids
    if not cfg.questions:
        return []
    per_id: dict = {}
    for row_id, _ in done_pairs:
        per_id[row_id] = per_id.get(row_id, 0) + 1
    return [row_id for row_id, n in per_id.items() if n >= len(cfg.questions)]


def build_plan(
    cfg: AnnotateConfig,
    spec: InputSpec,
    done_ids: list | None = None,
    done_pairs: list | None = None,
    stats_actor: str | None = None,
):
    """The lazy Dataset of output rows.

    `done_ids`/`done_pairs` (from a previous run) are not asked again; the generation actors
    report their engines' counters, and listed inputs their row counts, to the named
    `stats_actor` when one is given.
    """

    columns = spec.columns
    ds = read_input(cfg.input, spec, stats_actor, cfg.preprocess_batch_size)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
    finished = finished_ids(cfg, done_ids or [], done_pairs or [])
    if finished:
        ds = ds.map_batches(
            drop_done,
            fn_kwargs={"id_column": columns.id, "done": pa.array(finished).cast(columns.id_type)},
            batch_format="pyarrow",
            batch_size=None,
        )
    return answer_rows(ds, cfg, spec, done_pairs, stats_actor)


def answer_rows(ds, cfg: AnnotateConfig, spec: InputSpec, done_pairs: list | None = None,
                stats_actor: str | None = None):
    """The plan from rows in the input's columns to output rows: the CPU stage, then the generation
    actors. The CLI feeds it what it read; `jobs.annotate.annotate`, a caller's own Dataset."""
    import ray

    columns = spec.columns
    # Small blocks from the start: every CPU task and actor gets work early, and rows reach the
    # output files as they are answered instead of all at the end.
    ds = ds.repartition(target_num_rows_per_block=cfg.preprocess_batch_size)
    res = plan_resources(cfg, ray.cluster_resources(), largest_node_cpus())
    log.info("plan: %s input%s; %s", spec.kind, f" of {spec.rows} rows" if spec.rows is not None else "", res)
    ds = ds.map_batches(
        prepare_batch,
        fn_kwargs={"cfg": stage_config(cfg, spec)},
        batch_size=cfg.preprocess_batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=cfg.cpu_workers),
        num_cpus=1,
        # Decoding holds about four bytes per pixel of the largest allowed image; reserving it
        # keeps big images from oversubscribing a node. Having its own resource shape also keeps
        # Ray from fusing this stage into the generation actors, so it scales apart from them.
        memory=preprocess_memory(cfg),
        udf_modifying_row_count=False,
    )
    in_flight = batches_in_flight(cfg.engine, cfg.batch_size)
    log.info(
        "generation: %s scheduler, %d batch(es) of %d rows in each actor at once",
        cfg.engine.scheduler, in_flight, cfg.batch_size,
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "engine_cfg": dataclasses.replace(cfg.engine, cpu_threads=res.cpu_threads or cfg.engine.cpu_threads),
            "id_column": columns.id, "keep": columns.keep, "stats_actor": stats_actor,
            "questions_mode": cfg.asks_questions, "done": frozenset(map(tuple, done_pairs or [])),
            "answers": cfg.answers,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=res.actors[0],
            max_size=res.actors[1],
            max_tasks_in_flight_per_actor=max(2, in_flight),
            max_concurrent_calls_per_actor=in_flight,
            # The engine is thread-safe and its loop steps every request in flight together.
            enable_true_multi_threading=in_flight > 1,
        ),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
        udf_modifying_row_count=cfg.asks_questions,  # a row per question
        # Ray Data restarts a lost actor (killed, or on a node that went away) and reruns its
        # batch (its defaults: max_restarts=-1, max_task_retries=-1); nothing was written for
        # that batch yet, so no row is lost or doubled.
    )
    return ds
