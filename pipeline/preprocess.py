"""CPU side of anyres: image bytes in, uint8 tiles out.

Decoding, resizing and tiling run on cheap CPU workers so a GPU never waits for JPEG decoding.
Tiles stay uint8 (a quarter of float32 in the object store); rescaling and normalisation happen
in the engine, on the model's device. The pixels equal what `LlavaNextImageProcessorPil` feeds
its normalisation, because the same PIL operations run in the same order.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_transforms import convert_to_rgb

from pipeline import anyres
from pipeline.config import ImageLimits

# Our own pixel limit is checked before decoding; PIL's bomb guard would only duplicate it.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be used (reported as its row's error, never raised out of a job)."""


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


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes to an RGB PIL image, upright, within the limits.

    The size is checked from the header before any pixel is decoded, so a decompression bomb
    costs microseconds. Animated images give their first frame. Transparency is composited on
    white and other modes converted by transformers' own `convert_to_rgb`.
    """
    if data is None or len(data) == 0:
        raise ImageError("empty image")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
                )
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = convert_to_rgb(image, return_numpy=True)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("cannot identify image file (not an image, or a format PIL cannot read)") from None
    except Exception as exc:  # PIL raises many types for bad files; all mean the same to a row
        raise ImageError(f"{type(exc).__name__}: {exc}") from None
    return Image.fromarray(rgb)


def _to_tile(image: Image.Image, spec: AnyresSpec) -> np.ndarray:
    """Apply the processor's per-tile resize and centre crop (identity when base size == crop)."""
    if image.size != (spec.base_size, spec.base_size):
        image = image.resize((spec.base_size, spec.base_size), Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    if spec.base_size != spec.crop:
        top = (spec.base_size - spec.crop) // 2
        arr = arr[top : top + spec.crop, top : top + spec.crop]
    return arr.transpose(2, 0, 1)


def tiles(image: Image.Image, spec: AnyresSpec) -> np.ndarray:
    """Anyres tiles of an RGB image as uint8 `(num_tiles, 3, crop, crop)`: base image, then the grid.

    The image is fitted into the best grid resolution with its aspect kept, centred on black,
    and cut row by row, exactly as the transformers processor does.
    """
    width, height = image.size
    target_h, target_w = anyres.best_resolution((height, width), [list(p) for p in spec.pinpoints])
    new_h, new_w = anyres.fit_within((height, width), (target_h, target_w))
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    rows, cols, c = target_h // spec.crop, target_w // spec.crop, spec.crop
    grid = canvas.reshape(rows, c, cols, c, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, c, c)
    if spec.base_size != spec.crop:
        grid = np.stack([_to_tile(Image.fromarray(t.transpose(1, 2, 0)), spec) for t in grid])
    base = image.resize((spec.base_size, spec.base_size), Image.Resampling.BICUBIC)
    return np.concatenate([_to_tile(base, spec)[None], grid])


@dataclass
class PreparedImage:
    """One image ready for the engine: its uint8 tiles and its upright size (height, width)."""

    tiles: np.ndarray
    size: tuple[int, int]


def prepare(data: bytes, spec: AnyresSpec, limits: ImageLimits = ImageLimits()) -> PreparedImage:
    """Decode and tile one image; raises `ImageError` for anything unusable."""
    image = decode(data, limits)
    return PreparedImage(tiles=tiles(image, spec), size=(image.height, image.width))
