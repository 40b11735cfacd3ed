"""CPU side of anyres: image bytes in, uint8 tiles out.

Decoding, resizing and tiling run on cheap CPU workers so a GPU never waits for JPEG decoding.
Tiles stay uint8 (a quarter of float32 in the object store); rescaling and normalisation happen
in the engine, on the model's device. The pixels equal what `LlavaNextImageProcessorPil` feeds
its normalisation, because the same PIL operations run in the same order.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_transforms import convert_to_rgb

from pipeline import anyres
from pipeline.config import ImageLimits
from pipeline.prompts import Formatter, PromptError
from pipeline.fetch import FetchError, fetch
from pipeline.read import image_sources
from pipeline.schemas import PREPARED_FIELDS, TILES

# Our own pixel limit is checked before decoding; PIL's bomb guard would only duplicate it.
Image.MAX_IMAGE_PIXELS = None
# The formats we mean to read. Pillow can open many more, some through outside programs (EPS runs
# Ghostscript on the file), so any other format is refused before a plugin sees the bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """An image that cannot be used (reported as its row's error, never raised out of a job)."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit."""


@dataclass(frozen=True)
class AnyresSpec:
    """What the tiler and the token counter need from a checkpoint's processor configuration."""

    pinpoints: tuple[tuple[int, int], ...]
    crop: int
    base_size: int
    patch_size: int
    additional_tokens: int
    select_strategy: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_checkpoint(cls, model_dir: str) -> "AnyresSpec":
        """Read the spec from a saved checkpoint's processor files, without loading weights."""
        with open(os.path.join(model_dir, "processor_config.json")) as f:
            proc = json.load(f)
        image_cfg = proc.get("image_processor")
        if image_cfg is None:
            with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
                image_cfg = json.load(f)
        size = image_cfg.get("size", {})
        base = size.get("shortest_edge") or min(size["height"], size["width"])
        crop = image_cfg.get("crop_size", {}).get("height", base)
        return cls(
            pinpoints=tuple(tuple(p) for p in image_cfg["image_grid_pinpoints"]),
            crop=int(crop),
            base_size=int(base),
            patch_size=int(proc["patch_size"]),
            additional_tokens=int(proc.get("num_additional_image_tokens", 0)),
            select_strategy=proc.get("vision_feature_select_strategy", "default"),
            image_mean=tuple(image_cfg["image_mean"]),
            image_std=tuple(image_cfg["image_std"]),
        )

    def num_image_tokens(self, image_size: anyres.Size) -> int:
        """Prompt tokens for one image of `image_size` (height, width)."""
        return anyres.num_image_tokens(
            image_size, [list(p) for p in self.pinpoints], self.crop, self.patch_size,
            self.additional_tokens, self.select_strategy,
        )


def _is_plain_rgb(image: Image.Image) -> bool:
    """RGB without transparency and upright: what the RGB conversion would return unchanged."""
    return (
        image.mode == "RGB"
        and image.info.get("transparency") is None
        and image.getexif().get(0x0112, 1) == 1
    )


EXIF_ORIENTATION = 0x0112
SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image once its EXIF orientation is applied, from the header alone."""
    width, height = image.size
    if image.getexif().get(EXIF_ORIENTATION, 1) in SWAPPED_ORIENTATIONS:
        width, height = height, width
    return height, width


def _draft(image: Image.Image, size: tuple[int, int], spec: AnyresSpec) -> None:
    """Let a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that still covers every size the
    tiling resizes to (the grid resolution the anyres maths pick for the original size, and the
    base tile), so fewer pixels are decoded only to be thrown away by the resize."""
    height, width = size
    target = anyres.best_resolution((height, width), [list(p) for p in spec.pinpoints])
    need_h, need_w = anyres.fit_within((height, width), target)
    need_h, need_w = max(need_h, spec.base_size), max(need_w, spec.base_size)
    if image.getexif().get(EXIF_ORIENTATION, 1) in SWAPPED_ORIENTATIONS:
        need_h, need_w = need_w, need_h
    image.draft(image.mode, (need_w, need_h))


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes to an RGB PIL image, upright, within the limits.

    The size is checked from the header before any pixel is decoded, so a decompression bomb
    costs microseconds. Animated images give their first frame. Transparency is composited on
    white and other modes converted by transformers' own `convert_to_rgb`.
    """
    return decode_sized(data, limits)[0]


def decode_sized(data: bytes, limits: ImageLimits = ImageLimits(), draft_for: AnyresSpec | None = None
                 ) -> tuple[Image.Image, tuple[int, int]]:
    """`decode`, and the image's original upright (height, width).

    With `draft_for`, a JPEG larger than that spec's tiling needs is decoded at a reduced scale
    (see `_draft`); the size returned is still the original's, which the tiling and the prompt's
    token count use.
    """
    if data is None or len(data) == 0:
        raise ImageError("empty image")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
                )
            size = _upright_size(image)
            if draft_for is not None and image.format == "JPEG":
                _draft(image, size, draft_for)
            image.seek(0)
            image.load()
            if _is_plain_rgb(image):
                return image, size  # the common photo: nothing to convert, so skip two full-image copies
            image = ImageOps.exif_transpose(image)
            rgb = convert_to_rgb(image, return_numpy=True)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("cannot identify image file (not a JPEG, PNG, WebP, GIF, BMP or TIFF image)") from None
    except Exception as exc:  # PIL raises many types for bad files; all mean the same to a row
        raise ImageError(f"{type(exc).__name__}: {exc}") from None
    return Image.fromarray(rgb), size


def _to_tile(image: Image.Image, spec: AnyresSpec) -> np.ndarray:
    """Apply the processor's per-tile resize and centre crop (identity when base size == crop)."""
    if image.size != (spec.base_size, spec.base_size):
        image = image.resize((spec.base_size, spec.base_size), Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    if spec.base_size != spec.crop:
        top = (spec.base_size - spec.crop) // 2
        arr = arr[top : top + spec.crop, top : top + spec.crop]
    return arr.transpose(2, 0, 1)


def tiles(image: Image.Image, spec: AnyresSpec, size: tuple[int, int] | None = None) -> np.ndarray:
    """Anyres tiles of an RGB image as uint8 `(num_tiles, 3, crop, crop)`: base image, then the grid.

    The image is fitted into the best grid resolution with its aspect kept, centred on black,
    and cut row by row, exactly as the transformers processor does. `size` (height, width) is
    the size the anyres maths use, when the image was decoded smaller than its original.

    Every tile is written once, straight from the resized image into the one output array (the
    black margins are the array's zeros), so beyond the two resizes the work is one copy of each
    resized image into numpy and one into its tiles.
    """
    height, width = size or (image.height, image.width)
    target_h, target_w = anyres.best_resolution((height, width), [list(p) for p in spec.pinpoints])
    new_h, new_w = anyres.fit_within((height, width), (target_h, target_w))
    rows, cols, c = target_h // spec.crop, target_w // spec.crop, spec.crop
    out = np.zeros((1 + rows * cols, 3, c, c), dtype=np.uint8)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    if spec.base_size == spec.crop:
        grid = out[1:].reshape(rows, cols, 3, c, c)
        for r in range(rows):
            y0, y1 = max(r * c, top), min((r + 1) * c, top + new_h)
            for q in range(cols):
                x0, x1 = max(q * c, left), min((q + 1) * c, left + new_w)
                if y0 < y1 and x0 < x1:
                    grid[r, q, :, y0 - r * c : y1 - r * c, x0 - q * c : x1 - q * c] = (
                        resized[y0 - top : y1 - top, x0 - left : x1 - left].transpose(2, 0, 1)
                    )
    else:  # checkpoints whose tiles are resized again and centre-cropped
        canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
        canvas[top : top + new_h, left : left + new_w] = resized
        cells = canvas.reshape(rows, c, cols, c, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, c, c, 3)
        out[1:] = np.stack([_to_tile(Image.fromarray(np.ascontiguousarray(t)), spec) for t in cells])
    out[0] = _to_tile(image.resize((spec.base_size, spec.base_size), Image.Resampling.BICUBIC), spec)
    return out


def image_digest(tiles: np.ndarray, size: tuple[int, int]) -> str:
    """Names an image by what the model sees of it (its tiles and size): equal names, equal features.

    SHA-256, cut to 128 bits: CPUs with SHA instructions hash a 7B checkpoint's 1.7 MB of tiles
    in half the time BLAKE2b takes (about 1.1 vs 2.2 ms measured here), and every image pays it.
    """
    h = hashlib.sha256()
    h.update(np.asarray(size, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(tiles).data)
    return h.hexdigest()[:32]


@dataclass
class PreparedImage:
    """One image ready for the engine: its uint8 tiles, its upright size (height, width), its digest."""

    tiles: np.ndarray
    size: tuple[int, int]
    digest: str


def prepare(data: bytes, spec: AnyresSpec, limits: ImageLimits = ImageLimits(), fast: bool = False) -> PreparedImage:
    """Decode and tile one image; raises `ImageError` for anything unusable.

    `fast` decodes big JPEGs at a reduced scale (not bit-exact; see `decode`); the size and the
    token count stay the original's.
    """
    image, size = decode_sized(data, limits, spec if fast else None)
    image_tiles = tiles(image, spec, size)
    return PreparedImage(tiles=image_tiles, size=size, digest=image_digest(image_tiles, size))


@dataclass(frozen=True)
class StageConfig:
    """What the CPU stage needs; small and picklable, so it ships to every task.

    Questions per row: `questions` (the same list for every row), else the list in
    `questions_column`, else the row's `prompt_column` value or `question`.
    """

    model: str
    prompt_format: str
    question: str
    id_column: str
    image_column: str
    prompt_column: str | None
    keep: tuple[str, ...] = ()
    limits: ImageLimits = field(default_factory=ImageLimits)
    fetch_timeout_s: float = 10.0
    fetch_threads: int = 16
    multi_image: bool = False
    status_column: str | None = None
    read_error_column: str | None = None
    questions: tuple[str, ...] = ()
    questions_column: str | None = None
    fast_decode: bool = False


@functools.lru_cache(maxsize=4)
def checkpoint_resources(model_dir: str, prompt_format: str) -> tuple[AnyresSpec, Formatter]:
    """Tiling spec and prompt formatter of a checkpoint, loaded once per worker process."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    text_type = getattr(AutoConfig.from_pretrained(model_dir).text_config, "model_type", None)
    return AnyresSpec.from_checkpoint(model_dir), Formatter.from_processor(processor, text_type, prompt_format)


def _fetch_all(rows: list[list], cfg: StageConfig) -> list[list]:
    """Fetch every source of every row concurrently; a failure becomes that source's FetchError."""

    def one(source):
        try:
            return fetch(source, cfg.fetch_timeout_s, cfg.limits.max_bytes)
        except FetchError as exc:
            return exc

    flat = [src for sources in rows for src in sources]
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.fetch_threads, len(flat)))) as pool:
        fetched = iter(list(pool.map(one, flat)))
    return [[next(fetched) for _ in sources] for sources in rows]


def _prepare_images(data: list, spec: AnyresSpec, cfg: StageConfig) -> list[PreparedImage]:
    """One row's images decoded and tiled; raises a stage-prefixed ValueError on the first problem."""
    for item in data:
        if isinstance(item, FetchError):
            raise ValueError(f"fetch: {item}")
    prepared = []
    for k, item in enumerate(data):
        try:
            prepared.append(prepare(item, spec, cfg.limits, cfg.fast_decode))
        except ImageError as exc:
            where = f" (image {k + 1} of {len(data)})" if len(data) > 1 else ""
            raise ValueError(f"decode: {exc}{where}") from None
    return prepared


def _row_questions(batch: pa.Table, cfg: StageConfig) -> list[list[str | None]]:
    """The questions each row asks (see StageConfig)."""
    if cfg.questions:
        return [list(cfg.questions)] * batch.num_rows
    if cfg.questions_column:
        return [list(v) if v else [None] for v in batch.column(cfg.questions_column).to_pylist()]
    asked = batch.column(cfg.prompt_column).to_pylist() if cfg.prompt_column else [None] * batch.num_rows
    return [[q if q is not None else cfg.question] for q in asked]


def _format(formatter: Formatter, question: str | None, images: int) -> tuple[str | None, str | None]:
    """(formatted prompt, None) or (None, a `prompt:` error) for one question."""
    if question is None:
        return None, "prompt: the row has no questions"
    try:
        return formatter.question(question, images), None
    except PromptError as exc:
        return None, f"prompt: {exc}"


def prepare_batch(batch: pa.Table, cfg: StageConfig) -> pa.Table:
    """CPU stage: manifest rows -> formatted prompts and uint8 tiles, one output row per input row.

    Reads the manifest columns and writes `schemas.PREPARED_COLUMNS` (plus the id and kept
    columns unchanged): each image of a row is fetched, decoded and tiled once, whatever the
    number of questions asked of it. A row that fails keeps an `error` and no tiles.
    """
    from ray.data.extensions import ArrowVariableShapedTensorArray

    spec, formatter = checkpoint_resources(cfg.model, cfg.prompt_format)
    images = batch.column(cfg.image_column).to_pylist()
    asked = _row_questions(batch, cfg)
    statuses = batch.column(cfg.status_column).to_pylist() if cfg.status_column else [None] * len(images)
    read_errors = batch.column(cfg.read_error_column).to_pylist() if cfg.read_error_column else [None] * len(images)
    sources, errors = [], [None] * len(images)
    for i, value in enumerate(images):
        if read_errors[i] is not None:  # the reader already knows this row cannot be answered
            sources.append([])
            errors[i] = read_errors[i]
            continue
        try:
            if statuses[i] not in (None, "success"):
                raise FetchError(f"the download failed ({cfg.status_column}: {statuses[i]})")
            sources.append(image_sources(value, cfg.multi_image))
        except FetchError as exc:
            sources.append([])
            errors[i] = f"fetch: {exc}"
    fetched = _fetch_all(sources, cfg)
    empty = np.zeros((0, 3, spec.crop, spec.crop), dtype=np.uint8)
    tiles, counts, sizes, digests, prompts, prompt_errors = [], [], [], [], [], []
    for i in range(len(images)):
        row_tiles, row_counts, row_sizes, row_digests = empty, [], [], []
        formatted = [(None, None)] * len(asked[i])
        if errors[i] is None:
            try:
                prepared = _prepare_images(fetched[i], spec, cfg)
                row_tiles = np.concatenate([p.tiles for p in prepared])
                row_counts = [p.tiles.shape[0] for p in prepared]
                row_sizes = [v for p in prepared for v in p.size]
                row_digests = [p.digest for p in prepared]
                formatted = [_format(formatter, q, len(sources[i])) for q in asked[i]]
            except ValueError as exc:
                errors[i] = str(exc)
            except Exception as exc:  # whatever else a strange file triggers costs its row only
                errors[i] = f"preprocess: {type(exc).__name__}: {exc}"
        tiles.append(row_tiles if errors[i] is None else empty)
        counts.append(row_counts if errors[i] is None else [])
        sizes.append(row_sizes if errors[i] is None else [])
        digests.append(row_digests if errors[i] is None else [])
        # A failed row's prompt is the raw question, so the output still says what was asked.
        prompts.append([p if p is not None else q for (p, _), q in zip(formatted, asked[i])])
        prompt_errors.append([e for _, e in formatted])
    values = {
        "prompts": prompts, "questions": asked, "prompt_errors": prompt_errors, "error": errors,
        "tile_counts": counts, "image_sizes": sizes, "image_digests": digests,
    }
    columns = {name: batch.column(name) for name in dict.fromkeys((cfg.id_column, *cfg.keep))}
    columns.update({f.name: pa.array(values[f.name], f.type) for f in PREPARED_FIELDS})
    columns[TILES] = ArrowVariableShapedTensorArray.from_numpy(tiles)  # one type for every batch
    return pa.table(columns)
