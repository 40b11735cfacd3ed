"""Output side: guard the destination, write Parquet, and leave the run's config and summary.

The output is a directory (or S3 prefix) of Parquet files in the documented schema, with
`_config.json` (how the run was made) and `_summary.json` (what it produced) beside them.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.dataset as pads

from pipeline.read import arrow_filesystem, filesystem

CONFIG_FILE = "_config.json"
SUMMARY_FILE = "_summary.json"


class OutputExistsError(RuntimeError):
    """The output already holds results and --overwrite was not given."""


def prepare_output(uri: str, overwrite: bool) -> None:
    """Refuse an output that holds anything unless told to overwrite, then clear it."""
    fs, path = filesystem(uri)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        if not overwrite:
            raise OutputExistsError(f"output {uri} already holds results; pass --overwrite to replace them")
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)


def write_json(uri: str, name: str, payload: dict[str, Any]) -> None:
    """Write a small JSON file next to the output files."""
    fs, path = filesystem(uri)
    with fs.open(f"{path.rstrip('/')}/{name}", "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)


def read_output(uri: str) -> pads.Dataset:
    """The output as a plain pyarrow dataset (what an analyst would open)."""
    fs, path = filesystem(uri)
    return pads.dataset(path, format="parquet", filesystem=arrow_filesystem(fs), exclude_invalid_files=False)


def summarize(uri: str, rows_in: int, wall_s: float) -> dict[str, Any]:
    """Count what the output really holds: rows, answers, errors by stage, tokens."""
    table = read_output(uri).to_table(columns=["id", "error", "num_input_tokens", "num_output_tokens"])
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    by_stage: dict[str, int] = {}
    for e in errors:
        stage = e.split(":", 1)[0]
        by_stage[stage] = by_stage.get(stage, 0) + 1
    ids = table.column("id").to_pylist()
    return {
        "rows_in": rows_in,
        "rows_out": table.num_rows,
        "unique_ids_out": len(set(ids)),
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
