"""Manifest side: find the Parquet files, check their columns, read them, list a row's images.

Local paths, `file://` and `s3://` go through pipeline/storage.py; image bytes are fetched by
pipeline/fetch.py.
"""

from __future__ import annotations

import glob as globlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.fetch import FetchError
from pipeline.storage import arrow_filesystem, filesystem

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


def inspect_manifest(
    uri: str, id_column: str, keep: tuple[str, ...], image_column: str | None = None, questions_column: str | None = None,
) -> tuple[list[str], ManifestColumns]:
    """The manifest's files and checked columns (from the first file's schema)."""
    fs, _ = filesystem(uri)
    files = manifest_files(uri)
    schema = pq.read_schema(files[0], filesystem=arrow_filesystem(fs))
    return files, check_columns(schema, id_column, keep, uri, image_column, questions_column)


def count_rows(uri: str, files: list[str]) -> int:
    """Rows in the manifest, from the Parquet footers alone."""
    fs = arrow_filesystem(filesystem(uri)[0])
    return sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)


def read_manifest(uri: str, files: list[str], columns: ManifestColumns):
    """The manifest as a Ray Dataset of just the needed columns."""
    import ray

    # The newer Parquet datasource lists footers through helper actors that do not survive the
    # loss of their node, which aborts the job; the task-based reader is retried like any task.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    fs, _ = filesystem(uri)
    return ray.data.read_parquet(files, filesystem=arrow_filesystem(fs), columns=columns.names)


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
