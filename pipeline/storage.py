"""Where data lives: URIs to filesystems, and whole-file reads and writes, local or `s3://`.

Every module that reads or writes a path goes through here, so local disk and object stores are
reached the same way. fsspec resolves the URI (s3fs takes credentials and the endpoint from the
standard AWS variables, `AWS_ENDPOINT_URL` included); pyarrow and Ray Data get the same
filesystem wrapped by `arrow_filesystem`.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> PyFileSystem:
    """Wrap fsspec for pyarrow and Ray Data, so every store is reached the same way."""
    return PyFileSystem(FSSpecHandler(fs))


def join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def read_parquet_file(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, fetched whole through fsspec and parsed in memory.

    Reading through `arrow_filesystem` in the driver lets pyarrow's I/O threads call back into
    Python, and the interpreter then often aborts at exit ("terminate called without an active
    exception", status 134) after the work is done. Whole files in memory avoid that; and since
    pyarrow's own thread pools still aborted the exit now and then on a loaded machine (a pool torn
    down while a worker thread is joinable), the parse stays on the calling thread: output files
    are small and the summary reads them once.
    """
    return pq.read_table(pa.BufferReader(fs.cat_file(path)), columns=columns, use_threads=False, pre_buffer=False)


def write_parquet(uri: str, table: pa.Table) -> None:
    """One Parquet file at a URI."""
    fs, path = filesystem(uri)
    pq.write_table(table, path, filesystem=arrow_filesystem(fs))


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, payload: Any) -> None:
    fs, path = filesystem(uri)
    with fs.open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)
