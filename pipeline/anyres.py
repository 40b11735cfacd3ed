"""Anyres maths: numbers in, numbers out, no pixels and no I/O.

LLaVA-NeXT fits an image into the best of its checkpoint's grid resolutions, cuts that into
crop-sized tiles and adds a downscaled base image; the language model then sees a number of image
tokens that depends only on the original size. transformers' own functions are reused where they
exist so that our numbers cannot drift from the model's.
"""

from __future__ import annotations

import math

from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

Size = tuple[int, int]  # (height, width)

__all__ = [
    "best_resolution",
    "fit_within",
    "grid_shape",
    "num_tiles",
    "num_image_tokens",
]


def best_resolution(image_size: Size, pinpoints: list[list[int]]) -> Size:
    """The grid resolution (height, width) that keeps most of the image and wastes least."""
    height, width = select_best_resolution(tuple(image_size), [tuple(p) for p in pinpoints])
    return int(height), int(width)


def fit_within(image_size: Size, target: Size) -> Size:
    """Size of the image scaled to fit inside `target` with its aspect kept (before padding)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid_shape(image_size: Size, pinpoints: list[list[int]], crop: int) -> tuple[int, int]:
    """Number of tile rows and columns of the chosen grid."""
    rows, cols = get_anyres_image_grid_shape(tuple(image_size), pinpoints, crop)  # (h, w) despite its docstring
    return int(rows), int(cols)


def num_tiles(image_size: Size, pinpoints: list[list[int]], crop: int) -> int:
    """Tiles sent to the vision tower for one image: the grid plus the base image."""
    return int(image_size_to_num_patches(tuple(image_size), pinpoints, crop))


def _unpadded_features(image_size: Size, rows: int, cols: int) -> tuple[int, int]:
    """Feature rows and columns left after the model strips the letterbox padding of the grid."""
    height, width = image_size
    cur_h, cur_w = rows, cols
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    return cur_h, cur_w


def num_image_tokens(
    image_size: Size,
    pinpoints: list[list[int]],
    crop: int,
    patch_size: int,
    additional_tokens: int = 1,
    select_strategy: str = "default",
) -> int:
    """How many `<image>` tokens one image expands to in the prompt.

    The grid contributes its unpadded feature map plus one newline token per feature row; the
    base image contributes a full crop of patches plus the extra tokens (CLIP's CLS), of which the
    `default` strategy drops one again.
    """
    side = crop // patch_size
    rows, cols = grid_shape(image_size, pinpoints, crop)
    feat_h, feat_w = _unpadded_features(image_size, rows * side, cols * side)
    tokens = feat_h * feat_w + feat_h + side * side + additional_tokens
    return tokens - 1 if select_strategy == "default" else tokens
