"""Synthetic shapes: seeds fix samples, the truth matches the pixels, grids and formats all occur."""

import numpy as np
import pytest

from jobs.train_tiny import SHAPES_ARCH
from jobs import synthetic
from pipeline import anyres
from pipeline.preprocess import decode

SEEDS = range(150)


@pytest.fixture(scope="module")
def samples():
    return [synthetic.make_sample(s) for s in SEEDS]


def test_a_seed_always_gives_the_same_bytes():
    assert synthetic.make_sample(7).encoded() == synthetic.make_sample(7).encoded()
    assert synthetic.make_sample(7).encoded() != synthetic.make_sample(8).encoded()


def test_every_shape_colour_format_and_grid_occurs(samples):
    assert {s.shape for s in samples} == set(synthetic.SHAPES)
    assert {s.colour for s in samples} == set(synthetic.COLOURS)
    assert {s.fmt for s in samples} == {"PNG", "JPEG"}
    pinpoints = [list(p) for p in SHAPES_ARCH.pinpoints]
    grids = {anyres.best_resolution((s.image.height, s.image.width), pinpoints) for s in samples}
    assert {(128, 128), (64, 192), (192, 64)} <= grids  # square, wide and tall grids
    aspects = [s.image.width / s.image.height for s in samples]
    assert min(aspects) < 0.4 and max(aspects) > 2.5 and all(1 / 3.01 < a < 3.01 for a in aspects)
    sides = [max(s.image.size) for s in samples]
    assert min(sides) >= synthetic.MIN_LONG_SIDE and max(sides) <= synthetic.MAX_LONG_SIDE


def _shape_mask(sample) -> np.ndarray:
    """Pixels of a PNG sample that differ from the background (the commonest colour of the border)."""
    arr = np.asarray(decode(sample.encoded()))
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    values, counts = np.unique(border, axis=0, return_counts=True)
    background = values[counts.argmax()]
    assert background.min() >= 200, "backgrounds are light"
    return (arr != background).any(axis=2)


def test_the_named_colour_is_the_colour_drawn(samples):
    names = list(synthetic.COLOURS)
    refs = np.array([synthetic.COLOURS[n] for n in names], dtype=float)
    for sample in (s for s in samples if s.fmt == "PNG"):
        mean = np.asarray(sample.image)[_shape_mask(sample)].mean(axis=0)
        assert names[np.linalg.norm(refs - mean, axis=1).argmin()] == sample.colour, sample.seed


def test_the_named_shape_is_the_shape_drawn(samples):
    """Fill ratio of the bounding box tells the shapes apart: square 1, circle pi/4, triangle 1/2."""
    expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for sample in (s for s in samples if s.fmt == "PNG"):
        ys, xs = np.nonzero(_shape_mask(sample))
        ratio = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert min(expected, key=lambda k: abs(expected[k] - ratio)) == sample.shape, (sample.seed, ratio)


def test_answers_are_lower_case_words():
    assert synthetic.answer("shape", "circle", "red") == "circle"
    assert synthetic.answer("colour", "circle", "red") == "red"
    assert synthetic.answer("describe", "triangle", "blue") == "A blue triangle."
    with pytest.raises(ValueError):
        synthetic.answer("size", "circle", "red")


@pytest.mark.parametrize(
    "kind, response, ok",
    [
        ("shape", "circle", True),
        ("shape", "A red Circle.", True),
        ("shape", "circle or square", False),
        ("shape", "circles", False),
        ("colour", "red", True),
        ("colour", "red and green", False),
        ("colour", None, False),
        ("describe", "A red circle.", True),
        ("describe", "A blue circle.", False),
    ],
)
def test_scoring_wants_the_right_word_and_no_rival(kind, response, ok):
    assert synthetic.is_correct(kind, response, "circle", "red") is ok


def test_training_and_heldout_seeds_never_meet():
    train = synthetic.train_seeds(999, synthetic.TRAIN_STRIDE)
    assert train.stop <= synthetic.HELDOUT_BASE <= synthetic.heldout_seeds(0, 10).start
    assert not set(synthetic.train_seeds(0, 100)) & set(synthetic.train_seeds(1, 100))
    with pytest.raises(ValueError):
        synthetic.train_seeds(1000, 10)


def test_manifest_rows_hold_question_and_truth():
    table = synthetic.manifest(range(3))
    assert table.num_rows == 6
    rows = table.to_pylist()
    assert rows[0]["id"] == "0-shape" and rows[1]["id"] == "0-colour"
    assert rows[0]["prompt"] == "What shape is in the image?" and rows[1]["prompt"] == "What color is the shape?"
    sample = synthetic.make_sample(2)
    assert rows[4]["image"] == sample.encoded() and rows[4]["shape"] == sample.shape
    acc = synthetic.accuracy([{**r, "response": r["shape"] if r["kind"] == "shape" else "pink"} for r in rows])
    assert acc["shape"]["accuracy"] == 1.0 and acc["colour"]["accuracy"] == 0.0
