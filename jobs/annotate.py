"""Annotate images with LLaVA-NeXT on Ray (a Parquet manifest, a folder or bucket of images, or WebDataset
shards); write the answers as Parquet.

Usage: python -m jobs.annotate --input URI --output URI --model DIR [options]
The same command runs under `ray job submit -- python -m jobs.annotate ...` on a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import time
import uuid
from typing import Any

from pipeline.answers import AnswerSpec, Constraint, constraint_of, read_questions
from pipeline.config import (
    DEDUPE_MODES,
    INPUT_FORMATS,
    AnnotateConfig,
    ConfigError,
    ImageLimits,
    add_engine_arguments,
    answer_config_changes,
    engine_config_from,
    parse_actors,
    to_dict,
)

log = logging.getLogger("jobs.annotate")


# Defaults come from the configuration dataclass, so a default changes in one place.
D = {f.name: f.default for f in dataclasses.fields(AnnotateConfig) if f.default is not dataclasses.MISSING}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.annotate", description=__doc__.splitlines()[0])
    io = p.add_argument_group("data")
    io.add_argument("--input", required=True,
                    help="Parquet manifest, folder of images or WebDataset .tar shards: a file, directory/prefix or "
                         "glob; local or s3://")
    io.add_argument("--input-format", default=D["input_format"], choices=INPUT_FORMATS,
                    help="what --input holds (default: auto, decided from the files and logged)")
    io.add_argument("--output", required=True, help="output directory or s3:// prefix for Parquet results")
    io.add_argument("--id-column", default=D["id_column"],
                    help=f"manifest column holding unique row ids (default: {D['id_column']})")
    io.add_argument("--image-column", help="manifest column holding the image(s) (default: image or images)")
    io.add_argument("--questions-file", help="ask every image each question of this file (one per line, or a JSON "
                                             "list): one output row per (id, question_index)")
    io.add_argument("--questions-column", help="manifest column holding a list of questions per row")
    io.add_argument("--keep-columns", default="", help="comma-separated manifest columns copied to the output")
    io.add_argument("--dedupe", default=D["dedupe"], choices=DEDUPE_MODES,
                    help="ids that repeat, or rows without one, stop the job at start (none); 'first' keeps the "
                         "first row of each id and leaves out the rest, counted in the summary")
    io.add_argument("--limit", type=int, help="process only the first N rows")
    io.add_argument("--overwrite", action="store_true", help="replace an output that already holds results")
    io.add_argument("--resume", action="store_true", help="continue an interrupted run: skip ids already answered")
    io.add_argument("--retry-errors", action="store_true", help="re-run the rows whose error is set, replacing them")
    io.add_argument("--force-config", action="store_true",
                    help="with --resume/--retry-errors: continue even though settings that change answers differ")
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="checkpoint directory (saved with save_pretrained)")
    m.add_argument("--prompt", default=D["prompt"], help="question for rows whose prompt is null or missing")
    add_engine_arguments(m)
    a = p.add_argument_group("answers", "constrain every answer (per question: objects in --questions-file); the "
                                        "output's `answer` column then holds it as data")
    kind = a.add_mutually_exclusive_group()
    kind.add_argument("--json-schema", metavar="FILE_OR_JSON",
                      help="answers are JSON valid under this schema; `answer` is typed from it")
    kind.add_argument("--choices", help="answers are one of these comma-separated labels; adds `choice_probs`")
    kind.add_argument("--choices-file", help="as --choices, one label per line")
    kind.add_argument("--regex", help="answers match this regular expression")
    kind.add_argument("--grammar", metavar="FILE", help="answers follow this grammar (Lark, or GBNF)")
    a.add_argument("--logprobs", type=int, metavar="K",
                   help="add `token_logprobs`: each answer token's log-probability and its K best alternatives (0-20)")
    r = p.add_argument_group("resources")
    r.add_argument("--batch-size", type=int, default=D["batch_size"],
                   help=f"rows per call of the generation stage (static scheduler: per generate call; "
                        f"default: {D['batch_size']})")
    r.add_argument("--preprocess-batch-size", type=int, default=D["preprocess_batch_size"],
                   help=f"rows per CPU preprocessing task (default: {D['preprocess_batch_size']})")
    r.add_argument("--rows-per-file", type=int, default=D["rows_per_file"],
                   help=f"rows per output Parquet file (default: {D['rows_per_file']})")
    r.add_argument("--actors", type=parse_actors, help="generation actors: N or MIN-MAX (default: one per GPU)")
    r.add_argument("--gpus-per-actor", type=float, help="GPUs per generation actor (default: 1 if the cluster has GPUs)")
    r.add_argument("--cpu-workers", type=int, help="max concurrent CPU preprocessing tasks (default: Ray decides)")
    r.add_argument("--fetch-timeout", type=float, default=D["fetch_timeout_s"],
                   help=f"seconds before an image fetch fails (default: {D['fetch_timeout_s']:g})")
    r.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes, help="larger images are row errors")
    r.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels, help="larger images are row errors")
    r.add_argument("--fast-decode", action="store_true",
                   help="decode big JPEGs at a reduced scale that still covers the tiles (faster; not bit-exact)")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster (default: local or RAY_ADDRESS)")
    p.add_argument("--num-cpus", type=int, help="start a new local Ray instance with this many CPUs (default: join "
                                                "RAY_ADDRESS or a local cluster, else start one with the machine's)")
    return p


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None


def constraint_from_args(args: argparse.Namespace) -> Constraint | None:
    """The run's constraint from --json-schema, --choices(-file), --regex or --grammar (at most one)."""
    if args.json_schema:
        text = args.json_schema if args.json_schema.lstrip().startswith("{") else _read(args.json_schema, "--json-schema")
        return constraint_of("json_schema", text, "--json-schema")
    if args.choices or args.choices_file:
        text = args.choices.replace(",", "\n") if args.choices else _read(args.choices_file, "--choices-file")
        return Constraint.choices([c.strip() for c in text.splitlines() if c.strip()])
    if args.regex:
        return Constraint("regex", args.regex)
    return Constraint("grammar", _read(args.grammar, "--grammar")) if args.grammar else None


def check_constraints(constraints: list[Constraint | None]) -> None:
    """Compile every constraint of the run once, so one that cannot stops the job before any row is read
    (before its schema is typed: the backend's reason says more about a schema it cannot read)."""
    from actors.constraints import ConstraintError, check

    for constraint in dict.fromkeys(c for c in constraints if c is not None):
        try:
            check(constraint)
        except ConstraintError as exc:
            raise ConfigError(str(exc)) from None


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    engine = engine_config_from(args, args.model)
    questions, per_question = read_questions(args.questions_file) if args.questions_file else ((), ())
    constraint = constraint_from_args(args)
    check_constraints([constraint, *per_question])
    answers = AnswerSpec(constraint, per_question, args.logprobs)
    return AnnotateConfig(
        input=args.input,
        output=args.output,
        engine=engine,
        prompt=args.prompt,
        input_format=args.input_format,
        id_column=args.id_column,
        image_column=args.image_column,
        questions=questions,
        questions_column=args.questions_column,
        keep_columns=tuple(c.strip() for c in args.keep_columns.split(",") if c.strip()),
        limit=args.limit,
        overwrite=args.overwrite,
        resume=args.resume,
        retry_errors=args.retry_errors,
        force_config=args.force_config,
        batch_size=args.batch_size,
        preprocess_batch_size=args.preprocess_batch_size,
        rows_per_file=args.rows_per_file,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpu_workers=args.cpu_workers,
        fetch_timeout_s=args.fetch_timeout,
        limits=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels),
        fast_decode=args.fast_decode,
        dedupe=args.dedupe,
        answers=answers,
    )


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
