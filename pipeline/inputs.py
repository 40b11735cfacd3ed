"""The datasets users already have, as rows of `id` and `image`: Parquet manifests, folders and
buckets of image files, and WebDataset tar shards (img2dataset's layouts included).

`--input-format auto` looks at what the path holds and logs what it decided. Parquet manifests
are read as before (any id and image column names; an img2dataset `status` column marks rows
whose download failed). A folder or `s3://` prefix is listed inside the plan, page by page, so
rows start flowing before a listing of millions of objects ends; a row's id is the file's path
relative to the input root. WebDataset shards are read by Ray Data's own reader; a sample's id is
its key, its image the first of `jpg`/`jpeg`/`png`/`webp`, and `--keep-columns` may name fields
of its JSON and `txt`.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.stats import count_listed
from pipeline.read import ManifestColumns, ManifestError, count_rows, inspect_manifest, read_manifest
from pipeline.storage import arrow_filesystem, filesystem

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "parquet", "images", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LISTING_PAGE = 1000
STATUS_COLUMN = "status"  # img2dataset: "success" or why the download failed


@dataclass(frozen=True)
class InputSpec:
    """What `open_input` decided: the kind, the columns the CPU stage reads, and (for Parquet)
    the files and row count known before the run."""

    kind: str
    columns: ManifestColumns
    files: tuple[str, ...] = ()
    rows: int | None = None
    status_column: str | None = None


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def detect_format(uri: str) -> str:
    """Parquet, images or WebDataset, from the path or the first files under it."""
    fs, path = filesystem(uri)
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return "parquet"
    if lowered.endswith(".tar"):
        return "webdataset"
    if globlib.has_magic(path):
        names = fs.glob(path)[:50]
    elif fs.isdir(path):
        names = []
        for _, _, files in fs.walk(path):
            names += files
            if len(names) >= 50:
                break
    else:
        names = [path]
    if any(n.lower().endswith(".parquet") for n in names):
        return "parquet"
    if any(n.lower().endswith(".tar") for n in names):
        return "webdataset"
    if any(is_image_path(n) for n in names):
        return "images"
    raise ManifestError(
        f"cannot tell what {uri} holds (no .parquet, .tar or image files among its first entries); "
        "pass --input-format parquet|images|webdataset"
    )


def open_input(
    uri: str, kind: str, id_column: str, image_column: str | None, keep: tuple[str, ...],
    questions_column: str | None = None,
) -> InputSpec:
    """Check the input at start-up (a wrong path or column stops the job here, before any work)."""
    if kind == "auto":
        kind = detect_format(uri)
        log.info("input %s: read as %s (--input-format auto)", uri, kind)
    if kind != "parquet" and questions_column:
        raise ManifestError(f"--questions-column needs a Parquet manifest; {uri} is read as {kind}")
    if kind == "parquet":
        files, columns = inspect_manifest(uri, id_column, keep, image_column, questions_column)
        status = STATUS_COLUMN if STATUS_COLUMN in columns.available else None
        if status:
            columns = dataclasses.replace(columns, extra=(status,))
            log.info("input %s: rows whose %r is not 'success' are written as fetch errors", uri, status)
        return InputSpec(kind, columns, tuple(files), count_rows(uri, files), status)
    fs, path = filesystem(uri)
    if not globlib.has_magic(path) and not fs.exists(path):
        raise ManifestError(f"input {uri} does not exist")
    if kind == "images":
        if keep:
            raise ManifestError(f"--keep-columns {list(keep)}: a folder of images has no columns to keep")
        return InputSpec(kind, ManifestColumns("id", "image", None, ()))
    if kind == "webdataset":
        return InputSpec(kind, ManifestColumns("id", "image", None, keep))
    raise ManifestError(f"unknown input format {kind!r}; use one of {', '.join(INPUT_FORMATS)}")


# ---- folders and buckets of images ---------------------------------------------------------


def _root(uri: str) -> tuple[Any, str, str | None]:
    """The filesystem, the root ids are relative to, and the glob pattern (None: everything under it)."""
    fs, path = filesystem(uri)
    if globlib.has_magic(path):
        parts = path.split("/")
        fixed = next(i for i, p in enumerate(parts) if globlib.has_magic(p))
        return fs, "/".join(parts[:fixed]), path
    return fs, path.rstrip("/"), None


def _pages(fs: Any, root: str, pattern: str | None) -> Iterator[list[str]]:
    """Every file under the root, a page at a time, as the store hands them out."""
    if pattern is not None:
        yield sorted(fs.glob(pattern))
        return
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a"):
        bucket, _, prefix = root.partition("/")
        kwargs = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        while True:
            page = fs.call_s3("list_objects_v2", **kwargs)
            yield [f"{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
    if protocol in ("file", "local"):
        page: list[str] = []
        for directory, dirs, files in os.walk(root):
            dirs.sort()
            page += [os.path.join(directory, f) for f in sorted(files)]
            if len(page) >= LISTING_PAGE:
                yield page
                page = []
        yield page
        return
    yield sorted(fs.find(root))


def list_images(batch: pa.Table, uri: str, stats_actor: str | None = None) -> Iterator[pa.Table]:
    """Plan stage: the image files of the input, a table per listing page (`id`, `image` URI)."""
    fs, root, pattern = _root(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    for page in _pages(fs, root, pattern):
        files = [p for p in page if is_image_path(p)]
        if not files:
            continue
        ids = [p[len(root):].lstrip("/") if p.startswith(root) else p for p in files]
        count_listed(stats_actor, len(files))
        yield pa.table({"id": pa.array(ids, pa.string()), "image": pa.array([scheme + p for p in files], pa.string())})


# ---- WebDataset shards ---------------------------------------------------------------------


def webdataset_rows(batch: dict[str, Any], keep: tuple[str, ...], stats_actor: str | None = None) -> pa.Table:
    """Plan stage: WebDataset samples as rows of `id`, `image` bytes and the kept JSON/txt fields."""
    n = len(batch["__key__"])
    count_listed(stats_actor, n)
    images: list[bytes | None] = [None] * n
    for key in WEBDATASET_IMAGE_KEYS:
        if key in batch:
            images = [img if img is not None else _bytes(v) for img, v in zip(images, batch[key])]
    metadata = [_metadata(batch, i) for i in range(n)]
    columns = {"id": pa.array([str(k) for k in batch["__key__"]], pa.string()), "image": pa.array(images, pa.binary())}
    for name in keep:
        columns[name] = pa.array([_kept_value(m.get(name)) for m in metadata], pa.string())
    return pa.table(columns)


def _bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return bytes(value) if not isinstance(value, str) else value.encode()


def _metadata(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """A sample's JSON fields, and its `txt` as field `txt`."""
    out: dict[str, Any] = {}
    raw = batch.get("json")
    if raw is not None and raw[i] is not None:
        try:
            parsed = json.loads(_bytes(raw[i]))
            if isinstance(parsed, dict):
                out.update(parsed)
        except ValueError:
            pass
    text = batch.get("txt")
    if text is not None and text[i] is not None:
        out["txt"] = _bytes(text[i]).decode("utf-8", "replace")
    return out


def _kept_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def read_input(uri: str, spec: InputSpec, stats_actor: str | None = None):
    """The input as a lazy Ray Dataset of the columns the CPU stage reads; inputs listed inside
    the plan count their rows into `stats_actor`."""
    import ray

    if spec.kind == "parquet":
        return read_manifest(uri, list(spec.files), spec.columns)
    if spec.kind == "images":
        return ray.data.from_items([{"root": uri}]).map_batches(
            list_images, fn_kwargs={"uri": uri, "stats_actor": stats_actor}, batch_size=1, batch_format="pyarrow",
            udf_modifying_row_count=True,
        )
    fs, path = filesystem(uri)
    shards = sorted(fs.glob(path)) if globlib.has_magic(path) else path
    return ray.data.read_webdataset(shards, filesystem=arrow_filesystem(fs), decoder=None).map_batches(
        webdataset_rows, fn_kwargs={"keep": spec.columns.keep, "stats_actor": stats_actor}, batch_format="numpy",
        udf_modifying_row_count=False,
    )
