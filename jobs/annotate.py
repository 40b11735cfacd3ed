"""Annotate images with LLaVA-NeXT on Ray (a Parquet manifest, a folder or bucket of images, or WebDataset
shards); write the answers as Parquet.

Usage: python -m jobs.annotate --input URI --output URI --model DIR [options]
The same command runs under `ray job submit -- python -m jobs.annotate ...` on a cluster.
From Python, `annotate(ds, model=..., **options)` runs the same plan on a Ray Dataset you already
have and returns the lazy Dataset of output rows.
"""

from __future__ import annotations

import json
import logging
import shlex
import signal
import sys
import time
import uuid
from typing import Any

from jobs.options import config_from_args, options_config, parser
from pipeline.config import AnnotateConfig, ConfigError, answer_config_changes, to_dict

__all__ = ["annotate", "config_from_args", "main", "parser", "run"]

log = logging.getLogger("jobs.annotate")


def annotate(ds: Any, model: str, **options: Any) -> Any:
    """The job's plan on a Ray Dataset you already have: the lazy Dataset of output rows.

    Its columns follow a manifest's rules (`id_column`, `image`/`images` or `image_column`, an
    optional `prompt`); images may be bytes, URIs, `{bytes, path}` structs, or decoded ones from
    `ray.data.read_images` (use `include_paths=True` and `id_column="path"`) or PIL images.
    `options` are the CLI's flags as keyword arguments (`max_new_tokens=16`, `scheduler="static"`,
    `questions=[...]`, `choices=["a", "b"]`, `json_schema={...}`, `logprobs=3`, ...), checked by the
    same configuration, so a wrong one raises ConfigError with the CLI's message. Nothing is
    written: filter, join or `write_parquet` the result yourself. Per-row errors are values in
    `error`. Ids are not checked for repeats (the CLI reads them before a run; a Dataset would have
    to be run twice for that).
    """
    from jobs.plan import answer_rows
    from pipeline.datasets import dataset_spec, encode_images

    cfg = options_config(model, options)
    spec, decoded = dataset_spec(ds, cfg.id_column, cfg.image_column, cfg.keep_columns, cfg.questions_column)
    if cfg.limit is not None:
        ds = ds.limit(cfg.limit)
    if decoded:
        ds = ds.map_batches(encode_images, fn_kwargs={"column": spec.columns.image, "multi": spec.columns.multi},
                            batch_format="pyarrow", batch_size=cfg.preprocess_batch_size)
    return answer_rows(ds, cfg, spec)


def check_continuation(cfg: AnnotateConfig) -> None:
    """A resumed or retried run must answer the way the first one did: refuse, naming the keys,
    when the output's `_config.json` differs in anything that changes answers."""
    from pipeline.storage import exists, join, read_json
    from pipeline.write import CONFIG_FILE, OutputExistsError

    saved = join(cfg.output, CONFIG_FILE)
    if not (cfg.resume or cfg.retry_errors) or cfg.force_config or not exists(saved):
        return
    previous = read_json(saved)
    changed = answer_config_changes(previous, json.loads(json.dumps(to_dict(cfg), default=str)))
    if changed:
        raise OutputExistsError(
            f"output {cfg.output} was made with a different {', '.join(changed)}; continuing it would mix "
            "answers of two configurations. Run with the same settings, write to a new --output, or pass "
            "--force-config to continue anyway"
        )


def run(cfg: AnnotateConfig) -> dict[str, Any]:
    """Run the whole job on the connected Ray cluster and return its summary."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from jobs.plan import build_plan
    from pipeline.inputs import open_input
    from pipeline.stats import JobStats, stage_times
    from pipeline.storage import arrow_filesystem, filesystem
    from pipeline.write import (
        CONFIG_FILE,
        SUMMARY_FILE,
        OutputState,
        output_schema,
        prepare_output,
        reconcile_output,
        summarize,
        write_empty_if_none,
        write_json,
    )

    start = time.perf_counter()
    spec = open_input(cfg.input, cfg.input_format, cfg.id_column, cfg.image_column, cfg.keep_columns,
                      cfg.questions_column, cfg.dedupe)
    check_continuation(cfg)
    continuing = cfg.resume or cfg.retry_errors
    prepare_output(cfg.output, cfg.overwrite, continuing)
    previous = reconcile_output(cfg.output) if continuing else OutputState()
    if continuing:
        log.info(
            "continuing %s: %d rows answered, %d failed rows to retry, %d unreadable files set aside",
            cfg.output, len(previous.done_pairs or previous.done_ids), len(previous.error_ids), len(previous.set_aside),
        )
    # On the driver's node: the counters outlive any worker node that goes away mid-job.
    stats_name = f"llava-job-stats-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stats = JobStats.options(name=stats_name, scheduling_strategy=here).remote()
    write_json(cfg.output, CONFIG_FILE, to_dict(cfg))
    ds = None
    if spec.rows != 0:
        ds = build_plan(cfg, spec, previous.done_ids, previous.done_pairs, stats_name)
        fs, path = filesystem(cfg.output)
        # Files of at most `rows_per_file` rows, each written as soon as it fills, so a stopped run
        # keeps its progress. The write tasks reserve no CPU: on a small machine every CPU is held by
        # the generation actor and the CPU stage, and a write that waited for one would wait for
        # the whole input to be prepared.
        ds.write_parquet(path, filesystem=arrow_filesystem(fs), min_rows_per_file=cfg.rows_per_file,
                         max_rows_per_file=cfg.rows_per_file, ray_remote_args={"num_cpus": 0})
    schema = output_schema(spec.columns.id_type, cfg.asks_questions, spec.kept_fields(), cfg.answers.fields())
    if write_empty_if_none(cfg.output, schema):
        log.info("the input had no rows to answer: wrote an empty file with the output schema")
    rows_in = spec.rows if spec.rows is not None else ray.get(stats.rows_listed.remote())
    if cfg.limit is not None:
        rows_in = min(rows_in, cfg.limit)
    summary = summarize(cfg.output, rows_in, time.perf_counter() - start, previous)
    summary["input_format"] = spec.kind
    if spec.ids is not None and not spec.ids.clean:
        summary.update(spec.ids.counts())
    repeated = summary["rows_out"] - summary.get("unique_pairs_out", summary["unique_ids_out"])
    if repeated:  # only an input whose ids could not be checked before the run gets here
        log.error("the output holds %d row(s) whose id repeats another's: the input repeats ids (fix it, or run "
                  "with --dedupe first on an input whose ids can be checked)", repeated)
    summary["stages"] = stage_times(ds) if ds is not None else {}
    if cfg.questions:
        summary["questions_per_row"] = len(cfg.questions)
    summary["engine"] = ray.get(stats.totals.remote()) if cfg.engine.scheduler == "continuous" else {}
    ray.kill(stats)
    write_json(cfg.output, SUMMARY_FILE, summary)
    return summary


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the job stops where it is (a KeyboardInterrupt, so no `except Exception` keeps it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def resume_command(argv: list[str]) -> str:
    """The command that continues an interrupted run: the same flags with --resume (not --overwrite)."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args and "--retry-errors" not in args:
        args.append("--resume")
    return shlex.join(["python", "-m", "jobs.annotate", *args])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser().error(str(exc))
    if args.num_cpus is not None and args.ray_address:
        parser().error("--num-cpus sizes a local Ray instance; a cluster (--ray-address) has its own")
    log.info("configuration: %s", json.dumps(to_dict(cfg), default=str))
    import ray

    from pipeline.read import ManifestError
    from pipeline.write import OutputExistsError, summary_table

    # --num-cpus asks for a new local instance of that size, never a cluster found on this machine.
    address = "local" if args.num_cpus is not None else args.ray_address
    ours = not ray.is_initialized()  # a caller's Ray (a notebook, a test) is left as it was
    ray.init(address=address, num_cpus=args.num_cpus, ignore_reinit_error=True, include_dashboard=False)
    # After ray.init, which installs its own: Ctrl-C, a SIGINT that a background launch left ignored,
    # and SIGTERM (`kill`, `ray job stop`) all stop the job the same way.
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = run(cfg)
    except (ManifestError, OutputExistsError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}")
        return 2
    except Interrupted as exc:
        previous[signal.SIGINT] = signal.SIG_IGN  # one stop is enough; let the shutdown finish
        print(f"stopped by {exc}; the output files written so far are kept. Continue with: {resume_command(argv)}")
        return 128 + exc.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if ours:
            ray.shutdown()
    print(summary_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
