"""Anyres maths equal transformers' own on many image sizes and two pinpoint sets."""

import numpy as np
import pytest
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_utils import ChannelDimension

from jobs.make_tiny_model import PINPOINTS as TINY_PINPOINTS
from pipeline import anyres

PINPOINTS_7B = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def sizes(n: int = 220, seed: int = 0) -> list[tuple[int, int]]:
    """Random sizes plus the edge cases: 1x1 and 1:100 aspects both ways."""
    rng = np.random.default_rng(seed)
    out = [(1, 1), (1, 100), (100, 1), (20, 2000), (2000, 20), (336, 336), (672, 1344)]
    out += [(int(h), int(w)) for h, w in rng.integers(1, 4000, size=(n, 2))]
    return out


class _Processor:
    """transformers' token counter, bound to a pinpoint set without loading a checkpoint."""

    def __init__(self, pinpoints, patch_size, additional):
        from transformers import LlavaNextProcessor

        self.proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
        self.proc.patch_size = patch_size
        self.proc.num_additional_image_tokens = additional
        self.proc.image_processor = type("IP", (), {"image_grid_pinpoints": pinpoints})()

    def tokens(self, size, crop):
        return self.proc._get_number_of_features(size[0], size[1], crop, crop) - 1


@pytest.mark.parametrize("pinpoints, crop, patch", [(TINY_PINPOINTS, 32, 8), (PINPOINTS_7B, 336, 14)])
def test_maths_equal_transformers(pinpoints, crop, patch):
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    reference = _Processor(pinpoints, patch, 1)
    for size in sizes():
        best = anyres.best_resolution(size, pinpoints)
        assert best == tuple(select_best_resolution(size, pinpoints))
        fake = np.empty((1, *size), dtype=np.uint8)
        assert anyres.fit_within(size, best) == tuple(get_patch_output_size(fake, best, ChannelDimension.FIRST))
        rows, cols = anyres.grid_shape(size, pinpoints, crop)
        assert (rows * crop, cols * crop) == best
        assert anyres.num_tiles(size, pinpoints, crop) == rows * cols + 1 == image_size_to_num_patches(
            size, pinpoints, crop
        )
        assert anyres.num_image_tokens(size, pinpoints, crop, patch) == reference.tokens(size, crop), size


def test_grids_follow_the_aspect():
    assert anyres.best_resolution((100, 1000), PINPOINTS_7B) == (336, 1008)
    assert anyres.best_resolution((1000, 100), PINPOINTS_7B) == (1008, 336)
    assert anyres.best_resolution((800, 800), PINPOINTS_7B) == (672, 672)
    assert anyres.num_image_tokens((672, 672), PINPOINTS_7B, 336, 14) == 2928
