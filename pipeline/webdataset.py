"""WebDataset shards as rows of `id`, `image` and kept fields, img2dataset's own layout included.

A shard is a tar file (`.tar`, or gzipped `.tar.gz`/`.tgz`) whose members are grouped into samples
by key: `dir/000012.jpg` and `dir/000012.json` are the `jpg` and `json` fields of sample
`dir/000012`, the sample's id. img2dataset writes each shard beside a Parquet file of the same
name that lists every URL it tried, with its key and download status, and a `_stats.json`; only
the successful downloads are in the tar. So a shard's Parquet (when there is one) gives its keys
before the run, for the id check, and its failed downloads become `fetch:` error rows, so every
URL of the dataset appears in the output once.

Shards are read by our own task per shard (the standard library's `tarfile`, streaming), not by
Ray Data's reader, so that a shard that is not a valid tar, or is cut short, costs its own rows
(error rows naming the shard) instead of the job: the samples before the damage are kept, and with
a sidecar the keys it lost are listed as errors too.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.ids import Keep, kept_rows
from pipeline.stats import count_listed
from pipeline.storage import filesystem

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
READ_ERROR = "read_error"  # set on rows the reader already knows cannot be answered


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_EXTENSIONS)


def sidecar_of(shard: str) -> str:
    """img2dataset's Parquet beside a shard: the same name with `.parquet` for the tar extension."""
    lowered = shard.lower()
    for ext in SHARD_EXTENSIONS:
        if lowered.endswith(ext):
            return shard[: -len(ext)] + ".parquet"
    return shard + ".parquet"


@dataclass(frozen=True)
class Shards:
    """The shards of an input, in order; `sidecars[i]` is shard i's img2dataset Parquet or None;
    `root` is what ids of broken shards are relative to."""

    root: str
    files: tuple[str, ...]
    sidecars: tuple[str | None, ...]


def find_shards(uri: str) -> Shards:
    """The shards under a path, directory/prefix or glob, found by extension (other files, such as
    img2dataset's Parquet and stats beside them, are not shards)."""
    fs, path = filesystem(uri)
    if globlib.has_magic(path):
        names = sorted(fs.glob(path))
        root = path.split("*", 1)[0].rsplit("/", 1)[0]
    elif fs.isdir(path):
        names = sorted(fs.find(path))
        root = path.rstrip("/")
    else:
        names = [path] if fs.exists(path) else []
        root = path.rsplit("/", 1)[0]
    present = set(names)
    files = tuple(n for n in names if is_shard(n))
    sidecars = tuple(sidecar_of(f) if sidecar_of(f) in present else None for f in files)
    return Shards(root, files, sidecars)


def _sidecar_rows(fs, path: str) -> pa.Table:
    """img2dataset's listing of one shard: key, status, error_message (null where not written), and
    whatever else it recorded (url, caption, ...), which a failed download's row can keep."""
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read(use_threads=False)
    if "key" not in table.column_names or "status" not in table.column_names:
        raise ValueError(f"{path} has no 'key' and 'status' columns, so it is not img2dataset's listing of its shard")
    if "error_message" not in table.column_names:
        table = table.append_column("error_message", pa.nulls(table.num_rows, pa.string()))
    return table


def shard_keys(uri: str, shards: Shards) -> list[tuple[str, list]] | None:
    """Every shard's keys before the run, from img2dataset's listings or, for local plain tars, the
    tar headers (no image is read); None when some shard's keys cannot be had cheaply (a remote
    shard without a listing), and the id check is then left to the summary."""
    fs, _ = filesystem(uri)
    local = (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]) in ("file", "local")
    out = []
    for shard, side in zip(shards.files, shards.sidecars):
        if side is not None:
            out.append((shard, _sidecar_rows(fs, side).column("key").to_pylist()))
        elif local and shard.lower().endswith(".tar"):
            try:
                with tarfile.open(shard, "r:") as tar:
                    out.append((shard, list(dict.fromkeys(_key(m.name)[0] for m in tar.getmembers() if m.isfile()))))
            except (tarfile.TarError, OSError):
                out.append((shard, []))  # its read task turns it into an error row
        else:
            return None
    return out


def _key(name: str) -> tuple[str, str]:
    """(sample key, field) of a tar member: the path up to the first dot of its file name."""
    name = name.removeprefix("./")
    folder, base = posixpath.split(name)
    stem, _, field = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, field.lower()


def _bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    return bytes(value) if not isinstance(value, str) else value.encode()


def _metadata(fields: dict[str, bytes]) -> dict[str, Any]:
    """A sample's JSON fields, and its `txt` as field `txt`."""
    out: dict[str, Any] = {}
    raw = fields.get("json")
    if raw is not None:
        try:
            parsed = json.loads(raw)
            if isinstance(parsed, dict):
                out.update(parsed)
        except ValueError:
            pass
    if fields.get("txt") is not None:
        out["txt"] = fields["txt"].decode("utf-8", "replace")
    return out


def _kept_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def sample_row(key: str, fields: dict[str, bytes], keep: tuple[str, ...]) -> dict[str, Any]:
    """One sample as a row: its first image field, the kept JSON/txt fields, or why it has no image."""
    image = next((fields[f] for f in IMAGE_FIELDS if fields.get(f) is not None), None)
    error = None
    if image is None:
        error = f"read: sample {key} has no image file (its fields: {', '.join(sorted(fields)) or 'none'})"
    metadata = _metadata(fields)
    return {"id": key, "image": image, READ_ERROR: error, **{name: _kept_value(metadata.get(name)) for name in keep}}


def _samples(fs, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard in tar order (members of one key are adjacent, as WebDataset writes them)."""
    with fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, field = _key(member.name)
            if k != key and key is not None:
                yield key, fields
                fields = {}
            key = k
            fields[field] = tar.extractfile(member).read()
        if key is not None:
            yield key, fields


def _shard_rows(fs, shard: str, sidecar: str | None, root: str, keep: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Every row one shard accounts for: its samples, then its listing's failed downloads, and if the
    tar is damaged, one error row per key it lost (or, with no listing, one for the shard)."""
    listing = _sidecar_rows(fs, sidecar) if sidecar is not None else None
    seen: set[str] = set()
    name = shard[len(root):].lstrip("/") if shard.startswith(root) else shard
    try:
        for key, fields in _samples(fs, shard):
            seen.add(key)
            yield sample_row(key, fields, keep)
    except Exception as exc:  # a damaged shard costs its own rows, never the job
        error = f"read: shard {name} is not a complete tar file ({type(exc).__name__}: {exc})"
        log.warning("%s", error)
        if listing is None:
            yield {"id": name, "image": None, READ_ERROR: error, **{k: None for k in keep}}
        else:
            ok = pc.equal(listing.column("status"), "success")
            for key in listing.filter(ok).column("key").to_pylist():
                if key not in seen:
                    yield {"id": key, "image": None, READ_ERROR: error, **{k: None for k in keep}}
    if listing is not None:
        failed = listing.filter(pc.invert(pc.equal(listing.column("status"), "success")))
        for row in failed.to_pylist():
            detail = f"{row['status']}: {row['error_message']}" if row["error_message"] else row["status"]
            yield {"id": row["key"], "image": None, READ_ERROR: f"fetch: the download failed (status: {detail})",
                   **{k: _kept_value(row.get(k)) for k in keep}}


def _table(rows: list[dict[str, Any]], keep: tuple[str, ...]) -> pa.Table:
    columns = {"id": pa.array([r["id"] for r in rows], pa.string()),
               "image": pa.array([r["image"] for r in rows], pa.binary()),
               READ_ERROR: pa.array([r[READ_ERROR] for r in rows], pa.string())}
    columns.update({name: pa.array([r[name] for r in rows], pa.string()) for name in keep})
    return pa.table(columns)


def read_shards(batch: pa.Table, uri: str, root: str, keep_fields: tuple[str, ...], keep: Keep, block_rows: int,
                stats_actor: str | None = None) -> Iterator[pa.Table]:
    """Plan stage: the rows of each shard in the batch, as tables of at most `block_rows` rows."""
    fs, _ = filesystem(uri)
    for shard, sidecar in zip(batch.column("shard").to_pylist(), batch.column("sidecar").to_pylist()):
        plan, seen, rows = keep.get(shard), {}, []
        for row in _shard_rows(fs, shard, sidecar, root, keep_fields):
            rows.append(row)
            if len(rows) >= block_rows:
                yield from _emit(rows, plan, seen, keep_fields, stats_actor)
                rows = []
        yield from _emit(rows, plan, seen, keep_fields, stats_actor)


def _emit(rows: list[dict[str, Any]], plan: dict | None, seen: dict, keep_fields: tuple[str, ...],
          stats_actor: str | None) -> Iterator[pa.Table]:
    if plan:
        rows = [rows[i] for i in kept_rows([r["id"] for r in rows], plan, seen)]
    if rows:
        count_listed(stats_actor, len(rows))
        yield _table(rows, keep_fields)


def read_webdataset(uri: str, shards: Shards, keep_fields: tuple[str, ...], keep: Keep | None = None,
                    block_rows: int = 16, stats_actor: str | None = None):
    """The shards as a lazy Ray Dataset of rows, one read task per shard."""
    import ray

    items = [{"shard": s, "sidecar": c} for s, c in zip(shards.files, shards.sidecars)]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read_shards, batch_size=1, batch_format="pyarrow", udf_modifying_row_count=True,
        fn_kwargs={"uri": uri, "root": shards.root, "keep_fields": keep_fields, "keep": keep or {},
                   "block_rows": block_rows, "stats_actor": stats_actor},
    )
