"""The batch job's options, from command-line flags (`python -m jobs.annotate`) or from keyword
arguments (`jobs.annotate.annotate`), into the one typed configuration both run on, so an option
means and checks the same thing either way."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from pipeline.answers import AnswerSpec, Constraint, constraint_of, constraint_option, parse_questions, read_questions
from pipeline.config import (
    DATASET_INPUT,
    DEDUPE_MODES,
    INPUT_FORMATS,
    AnnotateConfig,
    ConfigError,
    EngineConfig,
    ImageLimits,
    add_engine_arguments,
    engine_config_from,
    parse_actors,
)

DESCRIPTION = ("Annotate images with LLaVA-NeXT on Ray (a Parquet manifest, a folder or bucket of images, or "
               "WebDataset shards); write the answers as Parquet.")

# Defaults come from the configuration dataclass, so a default changes in one place.
D = {f.name: f.default for f in dataclasses.fields(AnnotateConfig) if f.default is not dataclasses.MISSING}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.annotate", description=DESCRIPTION)
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


# ---- keyword arguments ---------------------------------------------------------------------------

# The job's options a caller's own Dataset takes, beyond the engine's: the CLI's flags less those
# about paths and writing (the Dataset is the input; the caller writes the result).
PLAN_OPTIONS = ("prompt", "id_column", "image_column", "questions_column", "keep_columns", "limit", "batch_size",
                "preprocess_batch_size", "actors", "gpus_per_actor", "cpu_workers", "fetch_timeout_s",
                "fetch_threads", "fast_decode")
ANSWER_OPTIONS = ("questions", "json_schema", "choices", "regex", "grammar", "logprobs")
IMAGE_OPTIONS = ("max_image_bytes", "max_image_pixels")


def options_config(model: str, options: dict[str, Any]) -> AnnotateConfig:
    """The configuration for `annotate(ds, model=..., **options)`: the CLI's flags as keyword
    arguments (`max_new_tokens=`, `choices=[...]`, `questions=[...]`, ...), checked by the same
    dataclasses (raises ConfigError naming an unknown option and listing the known ones)."""
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    known = set(engine_fields) | set(PLAN_OPTIONS) | set(ANSWER_OPTIONS) | set(IMAGE_OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for annotate(); known: {', '.join(sorted(known))}")
    engine = EngineConfig(model=model, **{k: v for k, v in options.items() if k in engine_fields})
    plan = {k: v for k, v in options.items() if k in PLAN_OPTIONS}
    if isinstance(plan.get("keep_columns"), str):
        plan["keep_columns"] = plan["keep_columns"].split(",")
    plan["keep_columns"] = tuple(c.strip() for c in plan.get("keep_columns", ()) if c.strip())
    if isinstance(plan.get("actors"), (int, str)):
        plan["actors"] = parse_actors(str(plan["actors"]))
    questions, per_question = parse_questions(list(options["questions"]), "questions") \
        if options.get("questions") is not None else ((), ())
    constraint = constraint_option(options)
    check_constraints([constraint, *per_question])
    limits = ImageLimits(options.get("max_image_bytes", ImageLimits.max_bytes),
                         options.get("max_image_pixels", ImageLimits.max_pixels))
    return AnnotateConfig(input=DATASET_INPUT, output="", engine=engine, questions=questions, limits=limits,
                          answers=AnswerSpec(constraint, per_question, options.get("logprobs")), **plan)
