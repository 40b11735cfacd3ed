"""Manifest side: find the Parquet files, check their columns, read them, list a row's images.

Local paths, `file://` and `s3://` go through pipeline/storage.py; image bytes are fetched by
pipeline/fetch.py.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fetch import FetchError
from pipeline.ids import Keep, kept_rows
from pipeline.storage import filesystem

IMAGE_COLUMNS = ("image", "images")


class ManifestError(ValueError):
    """A manifest the job cannot read; stops the job before any work starts."""


def manifest_files(uri: str) -> list[str]:
    """A Parquet file, a directory or prefix of Parquet files, or a glob -> the files (sorted)."""
    fs, path = filesystem(uri)
    if globlib.has_magic(path):
        files = fs.glob(path)
    elif fs.isdir(path):
        files = [f for f in fs.find(path) if f.endswith(".parquet") and "/_" not in f[len(path) :]]
    elif fs.exists(path):
        files = [path]
    else:
        raise ManifestError(f"manifest {uri} does not exist")
    files = sorted(f for f in files if not fs.isdir(f))
    if not files:
        raise ManifestError(f"manifest {uri} holds no Parquet files")
    return files


@dataclass(frozen=True)
class ManifestColumns:
    """Which columns the job reads from a manifest.

    `multi` says the image column holds a list of images per row; `available` is every column
    the manifest has; `extra` are further columns a stage reads (e.g. a download status).
    """

    id: str
    image: str
    prompt: str | None
    keep: tuple[str, ...]
    id_type: pa.DataType = pa.string()
    available: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    multi: bool = False
    questions: str | None = None

    @property
    def names(self) -> list[str]:
        cols = [self.id, self.image] + ([self.prompt] if self.prompt else []) + list(self.keep) + list(self.extra)
        cols += [self.questions] if self.questions else []
        return list(dict.fromkeys(cols))


def check_columns(
    schema: pa.Schema,
    id_column: str,
    keep: tuple[str, ...],
    where: str,
    image_column: str | None = None,
    questions_column: str | None = None,
) -> ManifestColumns:
    """Fail fast, naming the columns found, when the manifest lacks what the job needs."""
    found = list(schema.names)
    images = [image_column] if image_column in found else [] if image_column else [c for c in IMAGE_COLUMNS if c in found]
    problems = []
    if id_column not in found:
        problems.append(f"no id column {id_column!r} (use --id-column to name another)")
    if not images:
        wanted = repr(image_column) if image_column else "'image' or 'images'"
        problems.append(f"no image column: expected {wanted} (use --image-column to name another)")
    if questions_column and questions_column not in found:
        problems.append(f"no questions column {questions_column!r}")
    missing_keep = [c for c in keep if c not in found]
    if missing_keep:
        problems.append(f"no columns {missing_keep} to keep")
    if problems:
        raise ManifestError(f"manifest {where}: {'; '.join(problems)}. Columns found: {', '.join(found)}")
    prompt = "prompt" if "prompt" in found else None
    image_type = schema.field(images[0]).type
    multi = pa.types.is_list(image_type) or pa.types.is_large_list(image_type)
    return ManifestColumns(id_column, images[0], prompt, tuple(keep), schema.field(id_column).type, tuple(found),
                           multi=multi, questions=questions_column)


@dataclass(frozen=True)
class Manifest:
    """A checked Parquet manifest: its files and their row counts, the columns the job reads, and
    the first file's schema (the types of kept columns, for an output with no rows)."""

    files: tuple[str, ...]
    rows_per_file: tuple[int, ...]
    columns: ManifestColumns
    schema: pa.Schema

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)


def _footers(fs, files: list[str]) -> list[tuple[pa.Schema, int]]:
    """(schema, rows) of each file, from its footer, fetched in threads (stores answer slowly)."""

    def one(path: str) -> tuple[pa.Schema, int]:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(one, files))


def _check_types(files: list[str], schemas: list[pa.Schema], names: list[str], where: str) -> None:
    """Every file must carry the columns the job reads, with the first file's types: a file that
    differs would otherwise stop the job halfway with an Arrow error."""
    first = schemas[0]
    problems = []
    for name in names:
        want = first.field(name).type
        odd = [(f, s.field(name).type if name in s.names else None) for f, s in zip(files, schemas)]
        odd = [(f, t) for f, t in odd if t != want]
        if odd:
            shown = ", ".join(f"{f.rsplit('/', 1)[-1]} ({t if t is not None else 'missing'})" for f, t in odd[:5])
            more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
            problems.append(f"column {name!r} is {want} in {files[0].rsplit('/', 1)[-1]} but differs in {shown}{more}")
    if problems:
        raise ManifestError(
            f"manifest {where}: its files disagree: {'; '.join(problems)}. Write every file with the same columns "
            "and types (or point --input at the files that match)"
        )


def inspect_manifest(
    uri: str, id_column: str, keep: tuple[str, ...], image_column: str | None = None, questions_column: str | None = None,
) -> Manifest:
    """The manifest's files, checked: the columns the job reads exist in every file with one type."""
    fs, _ = filesystem(uri)
    files = manifest_files(uri)
    footers = _footers(fs, files)
    schemas = [schema for schema, _ in footers]
    columns = check_columns(schemas[0], id_column, keep, uri, image_column, questions_column)
    names = columns.names + (["status"] if "status" in columns.available else [])
    _check_types(files, schemas, list(dict.fromkeys(names)), uri)
    return Manifest(tuple(files), tuple(rows for _, rows in footers), columns, schemas[0])


def read_ids(uri: str, files: tuple[str, ...], id_column: str) -> list[tuple[str, list]]:
    """The id column of every file, in row order (for the start-up id check)."""
    fs, _ = filesystem(uri)

    def one(path: str) -> tuple[str, list]:
        with fs.open(path, "rb") as f:
            return path, pq.ParquetFile(f).read(columns=[id_column], use_threads=False).column(0).to_pylist()

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(one, files))


def read_files(batch: pa.Table, uri: str, columns: list[str], id_column: str, keep: Keep,
               block_rows: int) -> Iterator[pa.Table]:
    """Plan stage: whole manifest files, in row order, as tables of at most `block_rows` rows.

    One task reads one file from its start, so `keep` (see pipeline/ids.py) can leave out the
    later rows of a duplicated id however the file's row groups are laid out.
    """
    fs, _ = filesystem(uri)
    for path in batch.column("path").to_pylist():
        plan, seen = keep.get(path), {}
        with fs.open(path, "rb") as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=block_rows, columns=columns,
                                                               use_threads=False):
                table = pa.Table.from_batches([record_batch])
                if plan:
                    rows = list(kept_rows(table.column(id_column).to_pylist(), plan, seen))
                    if len(rows) < table.num_rows:
                        table = table.take(pa.array(rows, pa.int64()))
                if table.num_rows:
                    yield table


def read_manifest(uri: str, manifest: Manifest, keep: Keep | None = None, block_rows: int = 16):
    """The manifest as a Ray Dataset of just the needed columns, one read task per file.

    Tasks, not the newer Parquet datasource: its footer listing runs in helper actors that do not
    survive the loss of their node, while a task is simply retried.
    """
    import ray

    files = [f for f, rows in zip(manifest.files, manifest.rows_per_file) if rows]
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files))).map_batches(
        read_files, batch_size=1, batch_format="pyarrow", udf_modifying_row_count=True,
        fn_kwargs={"uri": uri, "columns": manifest.columns.names, "id_column": manifest.columns.id,
                   "keep": keep or {}, "block_rows": block_rows},
    )


def image_sources(value: Any, multi: bool) -> list[Any]:
    """The image sources of one row: a list when the column holds lists, else a single source."""
    if value is None:
        raise FetchError("null image")
    if multi:
        sources = list(value)
        if not sources:
            raise FetchError("empty image list")
        return sources
    return [value]
