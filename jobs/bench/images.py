"""Photo-like JPEGs made from seeds: smooth shapes and gradients under sensor-like noise.

Flat synthetic images compress ten times better than photos and decode correspondingly faster,
which would flatter any decoder-bound stage; noise at the level of a phone camera's brings the
file sizes and decode times to those of real photos of the same size.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NOISE_SIGMA = 6.0
NOISE_TILE = 509  # prime, so the tiled noise never lines up with JPEG's 8x8 blocks


@functools.lru_cache(maxsize=8)
def _noise_tile(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((NOISE_TILE, NOISE_TILE, 3), dtype=np.float32) * NOISE_SIGMA).astype(np.int16)


def _noise(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel noise for a whole image, tiled from one block at a random offset (fast at 12 MP)."""
    tile = _noise_tile(int(rng.integers(8)))
    reps = (height // NOISE_TILE + 2, width // NOISE_TILE + 2, 1)
    dy, dx = (int(v) for v in rng.integers(0, NOISE_TILE, 2))
    return np.tile(tile, reps)[dy : dy + height, dx : dx + width]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image: a colour gradient, soft-edged shapes of many sizes, then noise."""
    rng = np.random.default_rng(seed)
    sw, sh = max(16, width // 8), max(16, height // 8)
    corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    small = Image.fromarray(corners).resize((sw, sh), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(20, 40))):
        cx, cy = rng.uniform(0, sw), rng.uniform(0, sh)
        rx, ry = rng.uniform(0.01, 0.25) * sw, rng.uniform(0.01, 0.25) * sh
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
    small = small.filter(ImageFilter.GaussianBlur(max(1.0, sw / 200)))
    base = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(base + _noise(width, height, rng), 0, 255).astype(np.uint8))


def photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """`photo_like` encoded as a baseline JPEG at `quality`, the usual camera and web setting."""
    buf = io.BytesIO()
    photo_like(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def workload_photo(i: int, seed: int | None = None) -> bytes:
    """Row `i`'s photo in the engine workloads: 320-448 x 240-288 px, sizes cycling so that rows
    fall into different anyres grids and prompt lengths; `seed` (default `i`) picks the content."""
    return photo_jpeg(320 + 32 * (i % 5), 240 + 24 * (i % 3), seed=i if seed is None else seed)
