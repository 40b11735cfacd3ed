"""Held-out evaluation of a shapes checkpoint through the real batch job.

Usage:
  python -m jobs.shapes_eval manifest OUT.parquet [--first N] [--count N]
  python -m jobs.annotate --input OUT.parquet --output RESULTS --model DIR --keep-columns kind,shape,colour
  python -m jobs.shapes_eval score RESULTS

`manifest` writes one row per held-out image and question kind (shape, colour) with the truth in
columns the job keeps; `score` reads the job's output and prints the accuracy per kind. Held-out
seeds start at `pipeline.synthetic.HELDOUT_BASE`, a range no training run draws from.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import pyarrow.parquet as pq

from jobs import synthetic
from pipeline.storage import arrow_filesystem, filesystem
from pipeline.write import read_rows

TRUTH_COLUMNS = ("kind", "shape", "colour")


def write_manifest(path: str, first: int, count: int) -> int:
    """Write the held-out manifest for seeds `HELDOUT_BASE + [first, first + count)`; returns its rows."""
    table = synthetic.manifest(synthetic.heldout_seeds(first, count))
    fs, inner = filesystem(path)
    pq.write_table(table, inner, filesystem=arrow_filesystem(fs))
    return table.num_rows


def read_results(uri: str) -> list[dict[str, Any]]:
    """The rows of a job's output (id, response, error and the kept truth columns)."""
    return read_rows(uri, ["id", "response", "error", *TRUTH_COLUMNS]).to_pylist()


def score(uri: str) -> dict[str, Any]:
    """Accuracy per question kind, and the number of rows that ended in an error."""
    rows = read_results(uri)
    return {"rows": len(rows), "errors": sum(r["error"] is not None for r in rows), **synthetic.accuracy(rows)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.shapes_eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="write a held-out manifest")
    m.add_argument("out", help="Parquet file to write (local or s3://)")
    m.add_argument("--first", type=int, default=20_000, help="first held-out offset (default: 20000)")
    m.add_argument("--count", type=int, default=200, help="number of images (two questions each)")
    s = sub.add_parser("score", help="score a job's output")
    s.add_argument("results", help="the job's --output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "manifest":
        rows = write_manifest(args.out, args.first, args.count)
        print(f"wrote {rows} rows for held-out seeds {synthetic.HELDOUT_BASE + args.first}..."
              f"{synthetic.HELDOUT_BASE + args.first + args.count - 1} to {args.out}")
    else:
        print(json.dumps(score(args.results), indent=2))


if __name__ == "__main__":
    main()
