"""Suite `preprocess`: our CPU anyres stage against transformers' PIL image processor, one core.

Both sides start from the same JPEG bytes and are configured like llava-v1.6-mistral-7b (336
crops, its five grid resolutions). The transformers side decodes and returns normalised float
pixels; ours returns uint8 tiles and leaves normalisation to the engine, so it is timed twice:
as the CPU stage alone, and with the engine's normalisation run on the same core. JPEG decoding
alone is the floor no preprocessing can go below; decoding plus the two bicubic resizes an exact
result needs (to the grid resolution and to the base tile) is the floor of the exact path. The
fast path (`--fast-decode`) decodes at a reduced DCT scale and is scored by its PSNR against
the exact tiles. Every image's pixels are compared on the way.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from actors.engine import Engine
from jobs.bench.common import Plot, SuiteResult, Target, one_core, seconds
from jobs.bench.images import photo_jpeg
from pipeline import anyres
from pipeline.preprocess import AnyresSpec, decode, prepare

log = logging.getLogger(__name__)

CONFIG_7B = Path(__file__).with_name("llava_v16_mistral_7b_config.json")
SIZES = [(640, 480), (1920, 1080), (4000, 3000)]
METHODS = ("decode", "floor", "ours_uint8", "ours_fast", "ours_normalised", "transformers")
TOLERANCE = 1e-5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def spec_7b() -> AnyresSpec:
    """The anyres spec of the 7B checkpoint, from the architecture file shipped with the suite."""
    cfg = json.loads(CONFIG_7B.read_text())
    crop = int(cfg["vision_config"]["image_size"])
    return AnyresSpec(
        pinpoints=tuple(tuple(p) for p in cfg["image_grid_pinpoints"]),
        crop=crop, base_size=crop, patch_size=int(cfg["vision_config"]["patch_size"]),
        additional_tokens=1, select_strategy=cfg["vision_feature_select_strategy"],
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


def transformers_processor(spec: AnyresSpec):
    """`LlavaNextImageProcessorPil` configured as the 7B checkpoint's processor is."""
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.base_size},
        crop_size={"height": spec.crop, "width": spec.crop},
        image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        image_mean=list(spec.image_mean), image_std=list(spec.image_std),
        do_convert_rgb=True,
    )


def cpu_normaliser(spec: AnyresSpec) -> Engine:
    """An `Engine` holding only what `pixel_batch` reads, so the engine's own normalisation code
    is what gets timed and compared, without loading a model."""
    engine = Engine.__new__(Engine)
    engine.device, engine.dtype = torch.device("cpu"), torch.float32
    engine._mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    engine._std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    return engine


@dataclass
class Case:
    """One JPEG of the benchmark set."""

    label: str
    data: bytes


def make_cases(per_size: int) -> list[Case]:
    return [
        Case(f"{w}x{h}", photo_jpeg(w, h, seed=1000 * k + i))
        for k, (w, h) in enumerate(SIZES)
        for i in range(per_size)
    ]


def check_equal(case: Case, spec: AnyresSpec, processor, normaliser: Engine) -> float:
    """Largest absolute difference between our normalised tiles and transformers' pixel values."""
    ours = normaliser.pixel_batch([prepare(case.data, spec).tiles])[0].numpy()
    theirs = processor(images=[Image.open(io.BytesIO(case.data))], return_tensors="np")["pixel_values"][0]
    if ours.shape != theirs.shape:
        raise AssertionError(f"{case.label}: tiles {ours.shape} but transformers gives {theirs.shape}")
    return float(np.max(np.abs(ours - theirs)))


def psnr(case: Case, spec: AnyresSpec) -> float:
    """dB of the fast path's tiles against the exact ones."""
    exact, fast = prepare(case.data, spec).tiles, prepare(case.data, spec, fast=True).tiles
    mse = float(np.mean((exact.astype(np.float64) - fast.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def time_case(case: Case, spec: AnyresSpec, processor, normaliser: Engine, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds of each method on one image, the methods interleaved so that a
    burst of load on a shared machine hits all of them alike."""

    def decode_only() -> None:
        Image.open(io.BytesIO(case.data)).convert("RGB")

    def floor() -> None:
        image = decode(case.data)
        size = (image.height, image.width)
        target = anyres.best_resolution(size, [list(p) for p in spec.pinpoints])
        new_h, new_w = anyres.fit_within(size, target)
        image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        image.resize((spec.base_size, spec.base_size), Image.Resampling.BICUBIC)

    def ours_uint8() -> None:
        prepare(case.data, spec)

    def ours_fast() -> None:
        prepare(case.data, spec, fast=True)

    def ours_normalised() -> None:
        normaliser.pixel_batch([prepare(case.data, spec).tiles])

    def theirs() -> None:
        processor(images=[Image.open(io.BytesIO(case.data))], return_tensors="np")

    calls = dict(zip(METHODS, (decode_only, floor, ours_uint8, ours_fast, ours_normalised, theirs)))
    best = {name: float("inf") for name in METHODS}
    for _ in range(repeats):
        for name, fn in calls.items():
            best[name] = min(best[name], seconds(fn))
    return best


def run(quick: bool) -> SuiteResult:
    per_size, repeats = (1, 1) if quick else (20, 3)
    spec = spec_7b()
    processor = transformers_processor(spec)
    normaliser = cpu_normaliser(spec)
    cases = make_cases(per_size)
    log.info("timing %d JPEGs (%s), best of %d, on one core", len(cases), ", ".join(f"{w}x{h}" for w, h in SIZES), repeats)
    with one_core() as core:
        time_case(cases[0], spec, processor, normaliser, 1)  # first calls pay for imports and caches
        max_diff = max(check_equal(c, spec, processor, normaliser) for c in cases)
        if max_diff > TOLERANCE:
            raise AssertionError(f"our normalised tiles differ from transformers by {max_diff} > {TOLERANCE}")
        timings = [(c, time_case(c, spec, processor, normaliser, repeats)) for c in cases]
        fidelity = {c.label: [] for c in cases}
        for c in cases:
            fidelity[c.label].append(psnr(c, spec))
    labels = [f"{w}x{h}" for w, h in SIZES] + ["overall"]
    totals = {label: {m: 0.0 for m in METHODS} for label in labels}
    counts = {label: 0 for label in labels}
    for case, best in timings:
        for label in (case.label, "overall"):
            counts[label] += 1
            for m in METHODS:
                totals[label][m] += best[m]
    ms = {label: {m: 1000 * totals[label][m] / counts[label] for m in METHODS} for label in labels}
    min_psnr = {label: min(v) for label, v in fidelity.items()}
    min_psnr["overall"] = min(min_psnr.values())
    rows = []
    for label in labels:
        t = ms[label]
        rows.append([
            label, t["decode"], t["floor"], t["ours_uint8"], t["ours_normalised"], t["transformers"],
            t["transformers"] / t["ours_normalised"], t["ours_uint8"] / t["floor"],
            t["ours_fast"], t["ours_uint8"] / t["ours_fast"], t["transformers"] / t["ours_fast"], min_psnr[label],
        ])
    overall = ms["overall"]
    ratios = {
        "speedup_ours_normalised_over_transformers": overall["transformers"] / overall["ours_normalised"],
        "speedup_ours_uint8_over_transformers": overall["transformers"] / overall["ours_uint8"],
        "ratio_ours_uint8_over_decode": overall["ours_uint8"] / overall["decode"],
        "ratio_ours_normalised_over_decode": overall["ours_normalised"] / overall["decode"],
    }
    for label in labels[:-1]:
        ratios[f"speedup_ours_normalised_over_transformers_{label}"] = ms[label]["transformers"] / ms[label]["ours_normalised"]
        ratios[f"ratio_ours_uint8_over_floor_{label}"] = ms[label]["ours_uint8"] / ms[label]["floor"]
        ratios[f"speedup_fast_over_exact_{label}"] = ms[label]["ours_uint8"] / ms[label]["ours_fast"]
    sizes_kib = {label: round(np.mean([len(c.data) for c in cases if c.label == label]) / 1024) for label in labels[:-1]}
    return SuiteResult(
        suite="preprocess",
        title="Preprocessing: our CPU anyres stage vs transformers' LlavaNextImageProcessorPil (one core)",
        header=[
            "size", "decode ms", "floor ms", "ours uint8 ms", "ours incl. normalisation ms", "transformers ms",
            "speedup over transformers", "ours / floor", "fast ms", "fast speedup over exact",
            "fast speedup over transformers", "fast PSNR dB (min)",
        ],
        rows=rows,
        ratios=ratios,
        targets=[
            *(Target(f"exact path / floor at {label}", ratios[f"ratio_ours_uint8_over_floor_{label}"], 1.15, False)
              for label in labels[:-1]),
            Target("speedup over transformers (incl. normalisation) at 640x480",
                   ratios["speedup_ours_normalised_over_transformers_640x480"], 2.2, True),
            Target("fast path / exact at 4000x3000", ratios["speedup_fast_over_exact_4000x3000"], 4.0, True),
            Target("fast path / exact at 1920x1080", ratios["speedup_fast_over_exact_1920x1080"], 1.8, True),
            Target("fast path PSNR against the exact tiles, dB (min)", min_psnr["overall"], 45.0, True),
        ],
        raw={
            "per_image_s": [{"size": c.label, "bytes": len(c.data), **best} for c, best in timings],
            "mean_ms": ms, "images_per_size": per_size, "repeats": repeats, "core": core,
            "max_abs_diff_vs_transformers": max_diff, "mean_jpeg_kib": sizes_kib, "fast_psnr_db": fidelity,
        },
        notes=[
            f"{len(cases)} photo-like JPEGs (quality 90; mean sizes {sizes_kib} KiB), best of {repeats} per image, "
            "one core; all methods start from the same bytes.",
            f"Every image's normalised tiles equal transformers' pixel_values (max abs difference {max_diff:.2g}).",
            "Floor: decode plus the two bicubic resizes (grid resolution, base tile) that exact tiles need. "
            "Fast: --fast-decode (JPEG decoded at the smallest DCT scale covering both resizes).",
        ],
        plot=Plot(
            title="Milliseconds per image, one core (lower is better)", ylabel="ms per image (log)",
            categories=labels,
            series={
                "JPEG decode": [ms[l]["decode"] for l in labels],
                "floor (decode + resizes)": [ms[l]["floor"] for l in labels],
                "ours (uint8 tiles)": [ms[l]["ours_uint8"] for l in labels],
                "ours, --fast-decode": [ms[l]["ours_fast"] for l in labels],
                "ours incl. normalisation": [ms[l]["ours_normalised"] for l in labels],
                "transformers": [ms[l]["transformers"] for l in labels],
            },
            log_scale=True,
        ),
    )
