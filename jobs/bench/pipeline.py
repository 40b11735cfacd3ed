"""Suite `pipeline`: the full Ray job against a plain single-process loop doing the same work.

Both read the same manifest, run the same CPU stage and the same `Engine` at the same batch
size on the tiny checkpoint, and write Parquet; the ratio of their wall times is what Ray costs
(or gains by overlapping decoding with generation). Cluster start-up is outside the timed
region; actor start-up is part of the job and is reported as the wall time of a one-batch run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.engine import Engine
from jobs import annotate
from jobs.bench.common import Plot, SuiteResult, Target, local_ray, seconds
from jobs.bench.images import photo_jpeg
from jobs.make_tiny_model import make_tiny_model
from pipeline.config import DEFAULT_QUESTION, AnnotateConfig, EngineConfig
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest

log = logging.getLogger(__name__)

IMAGE_SIZE = (640, 480)
BATCH_SIZE = 8
DISTINCT_IMAGES = 16


def write_manifest(path: Path, rows: int) -> None:
    """`rows` rows of inline photo-like JPEGs (a few distinct ones repeated: decoding cost is what
    matters, and it does not depend on whether bytes repeat)."""
    images = [photo_jpeg(*IMAGE_SIZE, seed=i) for i in range(DISTINCT_IMAGES)]
    pq.write_table(
        pa.table({"id": [f"row-{i:05d}" for i in range(rows)], "image": [images[i % len(images)] for i in range(rows)]}),
        path,
    )


def plain_loop(manifest: Path, output: Path, engine_cfg: EngineConfig, rows: int | None = None) -> dict[str, str]:
    """The baseline: load the engine, then read, prepare, generate and write batch by batch.

    Runs on one torch thread, as the job's actors are told to (`cpu_threads=1`): the suite
    measures what Ray costs or gains around the same engine, not more threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(engine_cfg)
        table = pq.read_table(manifest, columns=["id", "image"])
        if rows is not None:
            table = table.slice(0, rows)
        ids, images = table.column("id").to_pylist(), table.column("image").to_pylist()
        prompt = engine.format_question(DEFAULT_QUESTION, 1)
        answers: list[str | None] = []
        for start in range(0, len(images), BATCH_SIZE):
            requests = []
            for data in images[start : start + BATCH_SIZE]:
                prepared = prepare(data, engine.spec)
                requests.append(GenerationRequest(prompt, [prepared.tiles], [prepared.size]))
            answers += [r.response for r in engine.generate(requests)]
        pq.write_table(pa.table({"id": ids, "response": answers}), output)
    finally:
        torch.set_num_threads(threads)
    return dict(zip(ids, answers))


def ray_job(manifest: Path, output: Path, engine_cfg: EngineConfig, actors: int, rows: int | None = None,
            summaries: dict | None = None) -> dict[str, str]:
    """The real batch job (`jobs.annotate.run`) with a fixed number of generation actors; its
    `_summary.json` content goes into `summaries[output name]` when given."""
    cfg = AnnotateConfig(
        input=str(manifest), output=str(output), engine=engine_cfg, limit=rows, overwrite=True,
        batch_size=BATCH_SIZE, actors=(actors, actors), gpus_per_actor=0, cpu_workers=os.cpu_count(),
    )
    summary = annotate.run(cfg)
    if summary["errors"]:
        raise RuntimeError(f"the Ray job reported errors: {summary}")
    if summaries is not None:
        summaries[output.name] = summary
    table = pq.read_table(output, columns=["id", "response"])
    return dict(zip(table.column("id").to_pylist(), table.column("response").to_pylist()))


def run(quick: bool) -> SuiteResult:
    rows, max_new_tokens = (40, 8) if quick else (600, 32)
    # Two logical CPUs beyond the cores, so two CPU generation actors never starve the CPU stage.
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp, local_ray(num_cpus=(os.cpu_count() or 1) + 2):
        work = Path(tmp)
        model = str(make_tiny_model(work / "model"))
        manifest = work / "manifest.parquet"
        write_manifest(manifest, rows)
        engine_cfg = EngineConfig(model=model, max_new_tokens=max_new_tokens, device="cpu", cpu_threads=1)
        wall: dict[str, float] = {}
        answers: dict[str, dict[str, str]] = {}
        summaries: dict[str, dict] = {}

        def timed(name: str, fn) -> None:
            wall[name] = seconds(lambda: answers.__setitem__(name, fn()))
            log.info("%s: %.2f s", name, wall[name])

        if not quick:
            # A fresh cluster's first job also starts its pool of worker processes; a long-lived
            # cluster has them already, so that cost is left out like the cluster's own start.
            ray_job(manifest, work / "out-warmup", engine_cfg, 1, BATCH_SIZE)
            timed("ray_one_batch", lambda: ray_job(manifest, work / "out-startup", engine_cfg, 1, BATCH_SIZE))
            timed("loop_one_batch", lambda: plain_loop(manifest, work / "loop-startup.parquet", engine_cfg, BATCH_SIZE))
        timed("loop", lambda: plain_loop(manifest, work / "loop.parquet", engine_cfg))
        timed("ray_1_actor", lambda: ray_job(manifest, work / "out-1", engine_cfg, 1, summaries=summaries))
        static_cfg = dataclasses.replace(engine_cfg, scheduler="static")
        timed("ray_1_actor_static", lambda: ray_job(manifest, work / "out-static", static_cfg, 1))
        if quick:  # the smoke run leaves out the second actor
            wall["ray_2_actors"], answers["ray_2_actors"] = wall["ray_1_actor"], answers["ray_1_actor"]
        else:
            timed("ray_2_actors", lambda: ray_job(manifest, work / "out-2", engine_cfg, 2))
    equal = answers["loop"] == answers["ray_1_actor"] == answers["ray_2_actors"] == answers["ray_1_actor_static"]
    if not equal:
        raise AssertionError("the Ray job and the plain loop gave different answers for the same rows")
    ratios = {
        "ratio_ray_over_loop": wall["ray_1_actor"] / wall["loop"],
        "speedup_2_actors_over_1": wall["ray_1_actor"] / wall["ray_2_actors"],
        "speedup_continuous_job_over_static_job": wall["ray_1_actor_static"] / wall["ray_1_actor"],
    }
    if not quick:
        ratios["ratio_ray_startup_over_loop_startup"] = wall["ray_one_batch"] / wall["loop_one_batch"]
        ratios["ratio_ray_over_loop_after_startup"] = (
            (wall["ray_1_actor"] - wall["ray_one_batch"]) / (wall["loop"] - wall["loop_one_batch"])
        )
    stages = summaries["out-1"].get("stages", {})
    table = [
        ["plain loop", 1, wall["loop"], rows / wall["loop"], wall.get("loop_one_batch")],
        ["Ray job", 1, wall["ray_1_actor"], rows / wall["ray_1_actor"], wall.get("ray_one_batch")],
        ["Ray job, static scheduler", 1, wall["ray_1_actor_static"], rows / wall["ray_1_actor_static"], None],
        ["Ray job", 2, wall["ray_2_actors"], rows / wall["ray_2_actors"], None],
    ]
    cores = os.cpu_count()
    return SuiteResult(
        suite="pipeline",
        title="Batch job: Ray Data pipeline vs a plain single-process loop (tiny checkpoint, CPU)",
        header=["runner", "generation actors", "wall s", "rows/s", "one-batch run s (start-up)"],
        rows=[[c if c is not None else "-" for c in row] for row in table],
        ratios=ratios,
        targets=[
            Target("Ray wall time / plain loop", ratios["ratio_ray_over_loop"], 1.15, False),
            Target("continuous job rows/s / static job rows/s", ratios["speedup_continuous_job_over_static_job"], 1.0, True),
            *([Target("Ray wall time / plain loop, start-up subtracted", ratios["ratio_ray_over_loop_after_startup"],
                      1.1, False)] if not quick else []),
        ],
        raw={
            "wall_s": wall, "rows": rows, "batch_size": BATCH_SIZE, "max_new_tokens": max_new_tokens,
            "image_size": IMAGE_SIZE, "answers_equal": equal, "ray_logical_cpus": (cores or 1) + 2,
            "stages_1_actor": stages, "engine_1_actor": summaries["out-1"].get("engine", {}),
        },
        notes=[
            f"{rows} rows of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs, batch size {BATCH_SIZE}, {max_new_tokens} new tokens, "
            "greedy; every runner loads the engine inside its timed region and writes Parquet.",
            "Start-up: wall time of the same runner on one batch (plan, actor and engine start, one batch, write), "
            "after an untimed one-batch job has started the cluster's worker processes; "
            "`ratio_ray_over_loop_after_startup` compares the wall times with that subtracted.",
            f"Scaling from 1 to 2 actors is bounded by the {cores} physical cores, which the CPU stage and "
            "both actors share.",
            "Where the 1-actor job's time goes (Ray Data's stats, seconds summed over each stage's tasks, which "
            "overlap): " + "; ".join(f"{name} {v['wall_s']:.1f} s wall, {v['cpu_s']:.1f} s CPU in {v['tasks']} tasks"
                                     for name, v in stages.items()) + ".",
            "The loop and every Ray run gave identical answers for every row; the loop and the jobs run the "
            "continuous scheduler unless marked static.",
        ],
        plot=Plot(
            title="Rows per second (higher is better)", ylabel="rows/s",
            categories=["plain loop", "Ray, 1 actor", "Ray, 1 actor, static", "Ray, 2 actors"],
            series={"rows/s": [rows / wall["loop"], rows / wall["ray_1_actor"], rows / wall["ray_1_actor_static"],
                               rows / wall["ray_2_actors"]]},
        ),
    )
