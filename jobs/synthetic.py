"""Synthetic shapes: one coloured shape on a light background, with questions and their answers.

A seed fixes everything about a sample (size, aspect, background, shape, colour, shade, position,
file format), so a training set and a held-out set are just two disjoint ranges of seeds. The
images span aspect ratios from 1:3 to 3:1, so every anyres grid of a checkpoint gets used, and
answers name the shape and the colour in lower-case words, so scoring is a word match.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 205, 35),
}
KINDS = ("shape", "colour", "describe")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": (
        "What shape is in the image?",
        "Which shape do you see?",
        "What shape is this?",
        "Name the shape in the picture.",
        "What kind of shape is shown?",
    ),
    "colour": (
        "What color is the shape?",
        "What colour is the shape?",
        "Which color is the shape?",
        "What colour is it?",
        "What is the color of the shape?",
    ),
    "describe": (
        "Describe the image.",
        "Describe this image briefly.",
        "What is shown in this image?",
        "What do you see?",
    ),
}

# Seeds from here on are never used for training, whatever the training seed.
HELDOUT_BASE = 1_000_000_000
# Training seed S draws its images from [S * TRAIN_STRIDE, (S + 1) * TRAIN_STRIDE).
TRAIN_STRIDE = 1_000_000

SHADE_JITTER = 30
MIN_LONG_SIDE, MAX_LONG_SIDE = 240, 1000
MAX_ASPECT = 3.0


@dataclass(frozen=True)
class Sample:
    """One synthetic image, what is in it, and how it is encoded."""

    seed: int
    image: Image.Image
    shape: str
    colour: str
    fmt: str

    def encoded(self) -> bytes:
        """The image as file bytes (PNG, or JPEG at a seed-chosen quality)."""
        buf = io.BytesIO()
        if self.fmt == "JPEG":
            self.image.save(buf, "JPEG", quality=85 + self.seed % 11)
        else:
            self.image.save(buf, "PNG")
        return buf.getvalue()


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): the long side in [240, 1000] px, the aspect log-uniform in [1:3, 3:1]."""
    aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
    long_side = int(rng.integers(MIN_LONG_SIDE, MAX_LONG_SIDE + 1))
    if aspect >= 1:
        return long_side, max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), long_side


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, fill: tuple) -> None:
    """A shape of extent `d` centred on (cx, cy); a triangle stands on its base."""
    r = d / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # similar area to the circle, so size does not give the shape away
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        h = d * math.sqrt(3) / 2
        draw.polygon([(cx, cy - h / 2), (cx - r, cy + h / 2), (cx + r, cy + h / 2)], fill=fill)


def make_sample(seed: int) -> Sample:
    """The sample of a seed: always the same pixels for the same seed."""
    rng = np.random.default_rng(seed)
    width, height = _size(rng)
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    jitter = rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    short = min(width, height)
    d = rng.uniform(0.35, 0.8) * short
    cx = rng.uniform(d / 2, width - d / 2)
    cy = rng.uniform(d / 2, height - d / 2)
    image = Image.new("RGB", (width, height), background)
    _draw(ImageDraw.Draw(image), shape, cx, cy, d, fill)
    fmt = "JPEG" if rng.random() < 0.3 else "PNG"
    return Sample(seed=seed, image=image, shape=shape, colour=colour, fmt=fmt)


def answer(kind: str, shape: str, colour: str) -> str:
    """The expected answer to a question of `kind`: lower-case words, a sentence for descriptions."""
    if kind == "shape":
        return shape
    if kind == "colour":
        return colour
    if kind == "describe":
        return f"A {colour} {shape}."
    raise ValueError(f"unknown question kind {kind!r}")


def train_seeds(seed: int, count: int) -> range:
    """Image seeds of a training run; disjoint between training seeds and from the held-out range."""
    if not 0 <= count <= TRAIN_STRIDE or not 0 <= seed < HELDOUT_BASE // TRAIN_STRIDE:
        raise ValueError(f"training seed must be in [0, {HELDOUT_BASE // TRAIN_STRIDE}) and count <= {TRAIN_STRIDE}")
    return range(seed * TRAIN_STRIDE, seed * TRAIN_STRIDE + count)


def heldout_seeds(first: int, count: int) -> range:
    """Image seeds no training run ever sees: offsets from `HELDOUT_BASE`."""
    return range(HELDOUT_BASE + first, HELDOUT_BASE + first + count)


def manifest(seeds: range | list[int], kinds: tuple[str, ...] = ("shape", "colour"),
             fmt: str | None = None) -> pa.Table:
    """A job manifest: one row per (image, kind) with the canonical question and the truth;
    `fmt` ("JPEG" or "PNG") encodes every image that way instead of the seed's own choice."""
    rows: dict[str, list] = {k: [] for k in ("id", "image", "prompt", "kind", "shape", "colour")}
    for seed in seeds:
        sample = make_sample(seed)
        if fmt is not None:
            sample = replace(sample, fmt=fmt)
        data = sample.encoded()
        for kind in kinds:
            rows["id"].append(f"{seed}-{kind}")
            rows["image"].append(data)
            rows["prompt"].append(QUESTIONS[kind][0])
            rows["kind"].append(kind)
            rows["shape"].append(sample.shape)
            rows["colour"].append(sample.colour)
    return pa.table(rows, schema=pa.schema(
        [("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
         ("kind", pa.string()), ("shape", pa.string()), ("colour", pa.string())]
    ))


def _names(words: list[str], right: str, vocabulary) -> bool:
    """The right word is said and no other word of its vocabulary is."""
    return right in words and not any(w in words for w in vocabulary if w != right)


def is_correct(kind: str, response: str | None, shape: str, colour: str) -> bool:
    """Whether a response names the right shape (shape questions), colour, or both (descriptions)."""
    words = re.findall(r"[a-z]+", (response or "").lower())
    shape_ok = _names(words, shape, SHAPES)
    colour_ok = _names(words, colour, COLOURS)
    return {"shape": shape_ok, "colour": colour_ok, "describe": shape_ok and colour_ok}[kind]


def accuracy(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per kind: correct, total and fraction, from rows holding kind, shape, colour and response."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = out.setdefault(row["kind"], {"correct": 0, "total": 0})
        entry["total"] += 1
        entry["correct"] += int(is_correct(row["kind"], row.get("response"), row["shape"], row["colour"]))
    for entry in out.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    return out
