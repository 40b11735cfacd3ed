"""Output side: guard the destination, write Parquet, and leave the run's config and summary.

The output is a directory (or S3 prefix) of Parquet files in the documented schema, with
`_config.json` (how the run was made) and `_summary.json` (what it produced) beside them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.schemas import OUTPUT_FIELDS, QUESTION_FIELDS
from pipeline.storage import arrow_filesystem, filesystem, join, read_parquet_file, write_parquet
from pipeline.storage import write_json as write_json_file

log = logging.getLogger(__name__)

CONFIG_FILE = "_config.json"
SUMMARY_FILE = "_summary.json"
EMPTY_FILE = "empty.parquet"  # an input without rows still leaves a file with the output schema


class OutputExistsError(RuntimeError):
    """The output already holds results and --overwrite was not given."""


def _ours(name: str) -> bool:
    """A file this job writes into its output: data files, its config and summary, set-aside
    partial files and the temporary files of a replace."""
    return (name.endswith(".parquet") or name in (CONFIG_FILE, SUMMARY_FILE, EMPTY_FILE)
            or name.startswith("_partial-") or name.endswith(".parquet.tmp"))


def prepare_output(uri: str, overwrite: bool, continuing: bool = False) -> None:
    """Refuse an output that holds anything unless told to overwrite or continue it.

    Overwriting deletes only what an earlier run of this job wrote there (the output must hold its
    `_config.json`), file by file; an output holding anything else is refused, so a mistyped
    `--output` can never delete a manifest or someone's files. Continuing (resume, retry) keeps it
    for `reconcile_output`.
    """
    fs, path = filesystem(uri)
    if fs.exists(path) and not fs.isdir(path):
        raise OutputExistsError(f"output {uri} is a file; --output names a directory or prefix")
    entries = fs.find(path, withdirs=False) if fs.exists(path) else []
    if entries and not continuing:
        if not overwrite:
            raise OutputExistsError(
                f"output {uri} already holds results; pass --overwrite to replace them, "
                "--resume to continue them or --retry-errors to re-run their failed rows"
            )
        names = [e[len(path.rstrip("/")) + 1:] if e.startswith(path.rstrip("/") + "/") else e for e in entries]
        foreign = [n for n in names if "/" in n or not _ours(n)]
        if foreign or CONFIG_FILE not in names:
            shown = ", ".join(foreign[:5]) if foreign else "no _config.json"
            raise OutputExistsError(
                f"output {uri} holds files this job did not write ({shown}{', ...' if len(foreign) > 5 else ''}); "
                "--overwrite only replaces an earlier run's output. Choose a new or empty --output"
            )
        for entry in entries:
            fs.rm_file(entry)
    fs.makedirs(path, exist_ok=True)


@dataclass
class OutputState:
    """What a previous run left: answered ids (and, with several questions per image, answered
    (id, question_index) pairs), failed ids, and files set aside as unreadable."""

    done_ids: list = field(default_factory=list)
    error_ids: list = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    done_pairs: list = field(default_factory=list)


def _data_files(fs, path: str) -> list[str]:
    """Parquet files an analyst's reader would see (pyarrow skips names starting with _ or .)."""
    if not fs.exists(path):
        return []
    return sorted(
        f for f in fs.find(path) if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith(("_", "."))
    )


def reconcile_output(uri: str) -> OutputState:
    """Make a previous run's output safe to continue, and say which ids it already holds.

    A file without a readable footer (cut short by a killed driver) is renamed with a leading
    underscore, so no reader sees it; rows that carry an error are removed from their files,
    since this run answers those ids again. Both happen before any new row is written, so a
    crash at any point leaves every id at most once.
    """
    fs, path = filesystem(uri)
    afs = arrow_filesystem(fs)
    state = OutputState()
    for file in _data_files(fs, path):
        try:
            table = read_parquet_file(fs, file)
        except Exception as exc:  # a truncated file raises one of several arrow errors
            head, name = file.rsplit("/", 1)
            fs.mv(file, f"{head}/_partial-{name}")
            state.set_aside.append(name)
            log.warning("set aside unreadable output file %s (%s)", name, exc)
            continue
        failed = pc.is_valid(table.column("error"))
        answered = table.filter(pc.invert(failed))
        state.done_ids.extend(answered.column("id").to_pylist())
        if "question_index" in table.column_names:
            state.done_pairs.extend(zip(answered.column("id").to_pylist(),
                                        answered.column("question_index").to_pylist()))
        if pc.any(failed).as_py():
            state.error_ids.extend(table.filter(failed).column("id").to_pylist())
            kept = table.filter(pc.invert(failed))
            tmp = f"{file}.tmp"
            pq.write_table(kept, tmp, filesystem=afs)
            fs.mv(tmp, file)  # replace in one step: readers see the old or the new file, never half
    return state


def output_schema(id_type: pa.DataType, questions: bool, kept: list[pa.Field],
                  answers: list[pa.Field] = ()) -> pa.Schema:
    """The schema of the output files (see schemas.py): what a reader of an empty output still sees."""
    fields = [pa.field("id", id_type), *OUTPUT_FIELDS, *answers, *(QUESTION_FIELDS if questions else [])]
    return pa.schema(fields + [f for f in kept if f.name != "id"])


def write_empty_if_none(uri: str, schema: pa.Schema) -> bool:
    """Write one file with no rows when the output holds no data file, so readers find the schema."""
    fs, path = filesystem(uri)
    if _data_files(fs, path):
        return False
    write_parquet(join(uri, EMPTY_FILE), schema.empty_table())
    return True


def write_json(uri: str, name: str, payload: dict[str, Any]) -> None:
    """Write a small JSON file next to the output files."""
    write_json_file(join(uri, name), payload)


def read_rows(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The output's rows in one table, for the job's summary and for scripts that score it.

    Files are read with `read_parquet_file`, so a script that reads its results exits cleanly.
    """
    fs, path = filesystem(uri)
    tables = [read_parquet_file(fs, f, columns) for f in _data_files(fs, path)]
    if not tables:
        empty = pa.schema([pa.field("id", pa.string()), *OUTPUT_FIELDS]).empty_table()
        return empty.select(columns) if columns else empty
    return pa.concat_tables(tables, promote_options="default")


def summarize(uri: str, rows_in: int | None, wall_s: float, previous: OutputState | None = None) -> dict[str, Any]:
    """Count what the output really holds: rows, answers, errors by stage, tokens.

    `previous` is what an earlier run had left, so a resumed run reports what it skipped and
    retried; tokens count the whole output.
    """
    previous = previous or OutputState()
    table = read_rows(uri)
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    by_stage: dict[str, int] = {}
    for e in errors:
        stage = e.split(":", 1)[0]
        by_stage[stage] = by_stage.get(stage, 0) + 1
    ids = table.column("id").to_pylist()
    return {
        "rows_in": rows_in,
        "rows_out": table.num_rows,
        "skipped": len(previous.done_ids),
        "retried": len(previous.error_ids),
        "done": table.num_rows - len(previous.done_ids),
        "unique_ids_out": len(set(ids)),
        **({"unique_pairs_out": len(set(zip(ids, table.column("question_index").to_pylist())))}
           if "question_index" in table.column_names else {}),
        "ok": table.num_rows - len(errors),
        "errors": len(errors),
        "errors_by_stage": dict(sorted(by_stage.items())),
        "input_tokens": int(sum(table.column("num_input_tokens").to_pylist())),
        "output_tokens": int(sum(table.column("num_output_tokens").to_pylist())),
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(table.num_rows / wall_s, 3) if wall_s > 0 else None,
    }


def summary_table(summary: dict[str, Any]) -> str:
    """The summary as a small aligned two-column table for the terminal."""
    rows = [(k, json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
