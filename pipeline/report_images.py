"""Thumbnails of a report's sampled rows, read from the run's own input.

The output's `id` is the input's id, so each sampled id is looked up where the job found it, and
nothing else is read: in a Parquet manifest, the id column and then only the row groups that hold
sampled ids; in a folder or bucket of images, the file at the input root joined with the id (a
folder's ids are paths under its root), never a listing; in WebDataset shards, only the shards
that hold sampled keys (known from img2dataset's listings or a local tar's headers; otherwise the
shards in order, until every key is found). The bytes come through the job's own fetcher under
the run's byte limit and fetch timeout. An image that is gone, unreadable or over the run's pixel
limit becomes a placeholder that says why: the report is for looking at a run, so it never fails
on one row.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import ImageLimits
from pipeline.fetch import FetchError, fetch
from pipeline.inputs import _root, detect_format
from pipeline.read import image_sources, inspect_manifest
from pipeline.report import take_rows
from pipeline.storage import filesystem
from pipeline.webdataset import READ_ERROR, find_shards, read_shards, shard_keys

THUMBNAIL_PX = 160
FETCH_THREADS = 8
# The job's own allow-list (pipeline/preprocess.py FORMATS), repeated so that a report does not
# import transformers: Pillow opens other formats through outside programs (EPS: Ghostscript).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

ImageReader = Callable[[Any], bytes]  # an image source (bytes, URI, {bytes, path}) -> its bytes
Sources = dict[Any, "list[Any] | str"]  # id -> its image sources, or why they cannot be had


@dataclass(frozen=True)
class Thumbnail:
    """A row's first image as a small JPEG data URL, or (`url` None) why it cannot be shown;
    `images` is how many images the row has."""

    url: str | None
    missing: str | None = None
    images: int = 1


def thumbnail_url(data: bytes, max_pixels: int, size: int = THUMBNAIL_PX) -> str:
    """Image bytes to a JPEG data URL at most `size` pixels a side, upright.

    The pixel limit is checked from the header, and a JPEG is decoded at the smallest scale that
    still covers the thumbnail, so a large photo costs a fraction of a full decode.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image is {width}x{height} pixels, over the run's limit of {max_pixels}")
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image)
        image.thumbnail((size, size))
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            white = Image.new("RGBA", image.size, "white")
            image = Image.alpha_composite(white, image.convert("RGBA"))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _manifest_sources(uri: str, config: dict[str, Any], wanted: set) -> Sources:
    """Sampled ids' image values in a Parquet manifest; the first file holding an id wins, as with
    `--dedupe first`."""
    manifest = inspect_manifest(uri, config.get("id_column") or "id", (), config.get("image_column"))
    columns = manifest.columns
    fs, _ = filesystem(uri)

    def one(path: str) -> Sources:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            ids = parquet.read(columns=[columns.id], use_threads=False).column(0)
            hits = pc.indices_nonzero(pc.is_in(ids, value_set=pa.array(list(wanted), ids.type))).to_pylist()
            first: dict[Any, int] = {}
            for position, row_id in zip(hits, ids.take(pa.array(hits, pa.int64())).to_pylist()):
                first.setdefault(row_id, position)
            if not first:
                return {}
            order = sorted(first, key=first.get)
            values = take_rows(parquet, [first[i] for i in order], [columns.image]).column(0).to_pylist()
        found: Sources = {}
        for row_id, value in zip(order, values):
            try:
                found[row_id] = image_sources(value, columns.multi)
            except FetchError as exc:
                found[row_id] = str(exc)
        return found

    out: Sources = {}
    with ThreadPoolExecutor(max(1, min(16, len(manifest.files)))) as pool:
        for found in pool.map(one, manifest.files):
            for row_id, sources in found.items():
                out.setdefault(row_id, sources)
    return out


def _folder_sources(uri: str, wanted: set) -> Sources:
    """A folder's id is the file's path under the input root (see pipeline/inputs.py)."""
    _, root, _ = _root(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return {row_id: [f"{scheme}{root}/{row_id}"] for row_id in wanted}


def _shard_sources(uri: str, wanted: set) -> Sources:
    """Sampled keys' image bytes, from the shards that hold them, each read until its keys are found."""
    shards = find_shards(uri)
    listed = shard_keys(uri, shards)
    pairs = list(zip(shards.files, shards.sidecars))
    if listed is not None:
        pairs = [pair for pair, (_, keys) in zip(pairs, listed) if wanted.intersection(keys)]
    out: Sources = {}
    for shard, sidecar in pairs:
        batch = pa.table({"shard": [shard], "sidecar": pa.array([sidecar], pa.string())})
        for table in read_shards(batch, uri, shards.root, (), {}, block_rows=64):
            table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(list(wanted), pa.string())))
            for row in table.to_pylist():
                out.setdefault(row["id"], [row["image"]] if row["image"] is not None else row[READ_ERROR])
            if wanted <= out.keys():
                return out
    return out


def image_sources_of(config: dict[str, Any], ids: list) -> Sources:
    """Each sampled id's image sources as the job read them, or why there are none."""
    uri = config["input"]
    kind = config.get("input_format") or "auto"
    kind = detect_format(uri) if kind == "auto" else kind
    wanted = set(ids)
    if kind == "parquet":
        return _manifest_sources(uri, config, wanted)
    if kind == "images":
        return _folder_sources(uri, wanted)
    if kind == "webdataset":
        return _shard_sources(uri, wanted)
    return {row_id: f"the input format {kind!r} has no images to show" for row_id in ids}


def thumbnails(config: dict[str, Any] | None, ids: list, read_image: ImageReader | None = None) -> dict[Any, Thumbnail]:
    """A thumbnail or placeholder per id. `read_image` replaces the job's fetcher (tests count reads)."""
    if config is None or not config.get("input"):
        return {row_id: Thumbnail(None, "the output has no _config.json naming its input") for row_id in ids}
    limits = ImageLimits(**config.get("limits", {}))
    read = read_image or partial(fetch, timeout_s=float(config.get("fetch_timeout_s") or 10.0),
                                 max_bytes=limits.max_bytes)
    try:
        found = image_sources_of(config, ids)
    except Exception as exc:  # a moved or damaged input costs the thumbnails, not the report
        found = {row_id: f"the input {config['input']} cannot be read ({type(exc).__name__}: {exc})" for row_id in ids}

    def one(row_id: Any) -> Thumbnail:
        sources = found.get(row_id, "this id is not in the input any more")
        if isinstance(sources, str):
            return Thumbnail(None, sources)
        try:
            return Thumbnail(thumbnail_url(read(sources[0]), limits.max_pixels), None, len(sources))
        except FetchError as exc:
            return Thumbnail(None, str(exc), len(sources))
        except UnidentifiedImageError:
            return Thumbnail(None, f"not an image of the job's formats ({', '.join(FORMATS)})", len(sources))
        except Exception as exc:  # not an image, damaged, over the limit: the row shows why
            return Thumbnail(None, f"{type(exc).__name__}: {exc}", len(sources))

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        return dict(zip(ids, pool.map(one, ids)))
