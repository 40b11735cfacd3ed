"""CPU anyres stage: uint8 tiles that normalise to exactly what the transformers processor makes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import ImageLimits
from pipeline.preprocess import ImageError, decode, prepare
from tests.helpers import animated_gif, encode, exif_rotated, noise_image


def _palette_transparent() -> bytes:
    image = noise_image(90, 70, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=3)


def _rgba() -> bytes:
    arr = np.random.default_rng(5).integers(0, 256, (50, 80, 4), dtype=np.uint8)
    return encode(Image.fromarray(arr, "RGBA"))


def _sixteen_bit() -> bytes:
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 13) % 300
    return encode(Image.fromarray(arr.astype(np.uint16)))


ZOO = {
    "square": lambda: encode(noise_image(64, 64)),
    "wide": lambda: encode(noise_image(300, 80, seed=1)),
    "tall": lambda: encode(noise_image(40, 190, seed=2)),
    "tiny": lambda: encode(noise_image(1, 1)),
    "tiny-odd": lambda: encode(noise_image(5, 3)),
    "large-jpeg": lambda: encode(noise_image(3000, 2000, seed=8), "JPEG"),
    "sliver": lambda: encode(noise_image(2000, 20, seed=9)),
    "rgba": _rgba,
    "la": lambda: encode(noise_image(33, 44, seed=10, mode="LA")),
    "palette-transparent": _palette_transparent,
    "grayscale": lambda: encode(noise_image(70, 50, seed=11, mode="L")),
    "bilevel": lambda: encode(noise_image(70, 50, seed=12, mode="1")),
    "cmyk": lambda: encode(noise_image(80, 60, seed=13, mode="CMYK"), "JPEG"),
    "16-bit": _sixteen_bit,
    "exif-rotated": lambda: exif_rotated(120, 60, seed=3),
    "webp": lambda: encode(noise_image(100, 75, seed=14), "WEBP", lossless=True),
    "animated-gif": lambda: animated_gif(60, 40, (6, 7)),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_tiles_normalise_to_the_processor_pixels(name, engine, reference):
    data = ZOO[name]()
    prepared = prepare(data, engine.spec)
    assert prepared.tiles.dtype == np.uint8
    assert prepared.tiles.shape[1:] == (3, engine.spec.crop, engine.spec.crop)

    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    prompt = engine.format_question("What is shown in this image?", 1)
    expected = reference[0](images=[upright], text=prompt, return_tensors="pt")
    assert prepared.size == tuple(expected["image_sizes"][0].tolist())

    ours = engine.pixel_batch([prepared.tiles])[0]
    theirs = expected["pixel_values"][0]
    assert ours.shape == theirs.shape
    assert torch.max(torch.abs(ours - theirs)).item() <= 1e-5

    from pipeline.schemas import GenerationRequest

    ids, _ = engine.tokenize(GenerationRequest(prompt, [prepared.tiles], [prepared.size]))
    assert ids == expected["input_ids"][0].tolist()
    assert expected["attention_mask"][0].tolist() == [1] * len(ids)


def test_exif_orientation_is_applied():
    image = decode(exif_rotated(120, 60, seed=3))
    assert image.size == (60, 120)


def test_transparency_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode(encode(transparent)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "cannot identify"),
        (b"<html><body>not found</body></html>", "cannot identify"),
        (encode(noise_image(200, 200), "JPEG")[:600], "(?i)truncated"),
    ],
)
def test_bad_bytes_are_image_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode(data)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (9000, 8000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="over the limit"):
        decode(bomb)


def test_byte_limit():
    with pytest.raises(ImageError, match="bytes, over the limit of 100"):
        decode(encode(noise_image(30, 30)), ImageLimits(max_bytes=100))


# ---- --fast-decode: big JPEGs decoded at a reduced DCT scale ------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _jpeg_zoo() -> dict[str, bytes]:
    """Real JPEG variants of one photo-like picture, all larger than any 7B grid resolution."""
    from jobs.bench.images import photo_like

    photo = photo_like(2400, 1800, seed=31)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "baseline 4:2:0": encode(photo, "JPEG", quality=90, subsampling=2),
        "4:4:4": encode(photo, "JPEG", quality=95, subsampling=0),
        "progressive": encode(photo, "JPEG", quality=90, progressive=True),
        "grayscale": encode(photo.convert("L"), "JPEG", quality=90),
        "cmyk": encode(photo.convert("CMYK"), "JPEG", quality=90),
        "exif-rotated": encode(photo, "JPEG", quality=90, exif=exif),
        "tall": encode(photo.transpose(Image.Transpose.ROTATE_90).resize((1000, 3600)), "JPEG", quality=90),
    }


@pytest.fixture(scope="module")
def spec_7b():
    from jobs.bench.preprocess import spec_7b

    return spec_7b()


@pytest.mark.parametrize("name", list(_jpeg_zoo()))
def test_fast_decode_keeps_the_geometry_and_the_pixels_close(name, spec_7b):
    data = _jpeg_zoo()[name]
    exact, fast = prepare(data, spec_7b), prepare(data, spec_7b, fast=True)
    assert fast.size == exact.size and fast.tiles.shape == exact.tiles.shape
    assert _psnr(fast.tiles, exact.tiles) >= 45.0, name


def test_fast_decode_really_decodes_less_and_leaves_other_formats_exact(spec_7b):
    from pipeline.preprocess import decode_sized

    data = _jpeg_zoo()["baseline 4:2:0"]
    image, size = decode_sized(data, ImageLimits(), spec_7b)
    assert size == (1800, 2400) and image.size < (2400, 1800) and min(image.size) >= spec_7b.base_size
    png = encode(noise_image(1500, 1000, seed=3))
    assert np.array_equal(prepare(png, spec_7b, fast=True).tiles, prepare(png, spec_7b).tiles)
    small = encode(noise_image(300, 200, seed=4), "JPEG")
    assert np.array_equal(prepare(small, spec_7b, fast=True).tiles, prepare(small, spec_7b).tiles)


def test_only_the_formats_we_mean_are_opened(monkeypatch):
    """PostScript reached Pillow's EPS plugin, which runs Ghostscript on the client's file; a format
    outside JPEG, PNG, WebP, GIF, BMP and TIFF is refused before any plugin reads it."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    with pytest.raises(ImageError, match="not a JPEG, PNG, WebP, GIF, BMP or TIFF"):
        decode(eps)
    assert opened == []
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode(encode(noise_image(9, 7, seed=3), fmt)).size == (9, 7)
