"""Image helpers shared by the tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    """Encode a PIL image to bytes in `fmt`."""
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random image; random pixels make any mix-up of rows or tiles visible in the answers."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def exif_rotated(width: int, height: int, seed: int, orientation: int = 6) -> bytes:
    """A JPEG whose EXIF orientation tag asks viewers to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(noise_image(width, height, seed=seed), "JPEG", exif=exif, quality=95)


def animated_gif(width: int, height: int, seeds: tuple[int, ...]) -> bytes:
    """A GIF with one frame per seed; readers must use the first."""
    frames = [noise_image(width, height, seed=s).convert("P") for s in seeds]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def reference_tokens(reference, images: list[Image.Image], prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens from transformers' processor + `generate` on one prompt (the ground truth)."""
    import torch

    processor, model = reference
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def reference_answer(reference, images: list[Image.Image], prompt: str, max_new_tokens: int) -> str:
    """The reference's decoded answer, special tokens dropped."""
    tokens = reference_tokens(reference, images, prompt, max_new_tokens)
    return reference[0].tokenizer.decode(tokens, skip_special_tokens=True)
