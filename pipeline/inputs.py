"""The datasets users already have, as rows of `id` and `image`: Parquet manifests, folders and
buckets of image files, and WebDataset tar shards (img2dataset's layouts included).

`--input-format auto` looks at what the path holds and logs what it decided. Parquet manifests
are read as before (any id and image column names; an img2dataset `status` column marks rows
whose download failed). A folder or `s3://` prefix is listed inside the plan, page by page, so
rows start flowing before a listing of millions of objects ends; a row's id is the file's path
relative to the input root. WebDataset shards are read by pipeline/webdataset.py; a sample's id is
its key.

Before any work the ids are checked (pipeline/ids.py): a Parquet manifest's id column, a shard's
keys from img2dataset's listing or a local tar's headers. A folder's ids are paths, unique by
construction.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import DEDUPE_MODES
from pipeline.ids import IdCheck, Keep, check_ids, refusal
from pipeline.read import Manifest, ManifestColumns, ManifestError, inspect_manifest, read_ids, read_manifest
from pipeline.stats import count_listed
from pipeline.storage import filesystem
from pipeline.webdataset import READ_ERROR, Shards, find_shards, is_shard, read_webdataset, shard_keys

log = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "parquet", "images", "webdataset")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
LISTING_PAGE = 1000
STATUS_COLUMN = "status"  # img2dataset: "success" or why the download failed


@dataclass(frozen=True)
class InputSpec:
    """What `open_input` decided: the kind, the columns the CPU stage reads, what is known before the
    run (a manifest's files and rows, the shards), and the id check with its keep plan (None: the
    ids could not be checked before the run)."""

    kind: str
    columns: ManifestColumns
    rows: int | None = None
    status_column: str | None = None
    read_error_column: str | None = None
    manifest: Manifest | None = None
    shards: Shards | None = None
    ids: IdCheck | None = None

    @property
    def keep(self) -> Keep:
        return self.ids.keep if self.ids is not None else {}

    def kept_fields(self) -> list[pa.Field]:
        """The kept columns with their types (a folder's and a shard's are strings)."""
        schema = self.manifest.schema if self.manifest is not None else None
        return [schema.field(c) if schema is not None else pa.field(c, pa.string()) for c in self.columns.keep]


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _first_names(fs: Any, path: str, limit: int = 200) -> list[str]:
    if globlib.has_magic(path):
        return sorted(fs.glob(path))[:limit]
    if fs.isdir(path):
        names: list[str] = []
        for folder, _, files in fs.walk(path):
            names += [f"{folder}/{f}" for f in files]
            if len(names) >= limit:
                break
        return names
    return [path]


def detect_format(uri: str) -> str:
    """Parquet, images or WebDataset, from the path or the first files under it.

    Tar shards win over Parquet files when each Parquet file is a shard's img2dataset listing (the
    same name as a shard); Parquet files of their own next to shards are ambiguous.
    """
    fs, path = filesystem(uri)
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return "parquet"
    if is_shard(lowered):
        return "webdataset"
    names = _first_names(fs, path)
    parquets = [n for n in names if n.lower().endswith(".parquet")]
    shards = {n[: -len(ext)] for n in names for ext in (".tar", ".tar.gz", ".tgz") if n.lower().endswith(ext)}
    if shards:
        loose = [p for p in parquets if p[: -len(".parquet")] not in shards]
        if not loose:
            return "webdataset"
        raise ManifestError(
            f"{uri} holds both WebDataset shards and Parquet files that are not their img2dataset listings "
            f"(e.g. {loose[0].rsplit('/', 1)[-1]}); pass --input-format webdataset or parquet"
        )
    if parquets:
        return "parquet"
    if any(is_image_path(n) for n in names):
        return "images"
    raise ManifestError(
        f"cannot tell what {uri} holds (no .parquet, .tar or image files among its first entries); "
        "pass --input-format parquet|images|webdataset"
    )


def _checked(check: IdCheck | None, dedupe: str, where: str) -> IdCheck | None:
    """The id check, or the start-up refusal when ids repeat or are missing and --dedupe is off."""
    if check is None or check.clean:
        return check
    if dedupe == "none":
        raise ManifestError(refusal(check, where))
    log.warning("input %s: --dedupe first leaves out %d row(s) of repeated ids and %d without an id",
                where, check.dropped_duplicates, check.dropped_nulls)
    return check


def open_input(
    uri: str, kind: str, id_column: str, image_column: str | None, keep: tuple[str, ...],
    questions_column: str | None = None, dedupe: str = "none",
) -> InputSpec:
    """Check the input at start-up (a wrong path or column, or ids that are not unique, stop the job
    here, before any work)."""
    if dedupe not in DEDUPE_MODES:
        raise ManifestError(f"--dedupe must be one of {', '.join(DEDUPE_MODES)}; got {dedupe!r}")
    if kind == "auto":
        kind = detect_format(uri)
        log.info("input %s: read as %s (--input-format auto)", uri, kind)
    if kind != "parquet" and questions_column:
        raise ManifestError(f"--questions-column needs a Parquet manifest; {uri} is read as {kind}")
    if kind == "parquet":
        manifest = inspect_manifest(uri, id_column, keep, image_column, questions_column)
        columns = manifest.columns
        status = STATUS_COLUMN if STATUS_COLUMN in columns.available else None
        if status:
            columns = dataclasses.replace(columns, extra=(status,))
            manifest = dataclasses.replace(manifest, columns=columns)
            log.info("input %s: rows whose %r is not 'success' are written as fetch errors", uri, status)
        ids = _checked(check_ids(read_ids(uri, manifest.files, columns.id)), dedupe, uri)
        return InputSpec(kind, columns, manifest.rows, status, manifest=manifest, ids=ids)
    fs, path = filesystem(uri)
    if not globlib.has_magic(path) and not fs.exists(path):
        raise ManifestError(f"input {uri} does not exist")
    if kind == "images":
        if keep:
            raise ManifestError(f"--keep-columns {list(keep)}: a folder of images has no columns to keep")
        return InputSpec(kind, ManifestColumns("id", "image", None, ()))
    if kind == "webdataset":
        shards = find_shards(uri)
        if not shards.files:
            raise ManifestError(f"input {uri} holds no WebDataset shards ({', '.join(('.tar', '.tar.gz', '.tgz'))})")
        keys = shard_keys(uri, shards)
        if keys is None:
            log.info("input %s: shards without an img2dataset listing on a remote store; their keys are checked "
                     "for repeats in the summary, not before the run", uri)
        ids = _checked(check_ids(keys) if keys is not None else None, dedupe, uri)
        columns = ManifestColumns("id", "image", None, keep, extra=(READ_ERROR,))
        rows = ids.rows if ids is not None and all(shards.sidecars) else None
        return InputSpec(kind, columns, rows, read_error_column=READ_ERROR, shards=shards, ids=ids)
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


def read_input(uri: str, spec: InputSpec, stats_actor: str | None = None, block_rows: int = 16):
    """The input as a lazy Ray Dataset of the columns the CPU stage reads, in blocks of about
    `block_rows`; inputs listed inside the plan count their rows into `stats_actor`."""
    import ray

    if spec.kind == "parquet":
        return read_manifest(uri, spec.manifest, spec.keep, block_rows)
    if spec.kind == "webdataset":
        return read_webdataset(uri, spec.shards, spec.columns.keep, spec.keep, block_rows, stats_actor)
    return ray.data.from_items([{"root": uri}]).map_batches(
        list_images, fn_kwargs={"uri": uri, "stats_actor": stats_actor}, batch_size=1, batch_format="pyarrow",
        udf_modifying_row_count=True,
    )
