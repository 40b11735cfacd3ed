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


def data_url(image: Image.Image) -> str:
    """A PNG data URL, as an OpenAI client sends an inline image."""
    import base64

    return "data:image/png;base64," + base64.b64encode(encode(image)).decode()


def openai_to_internal(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the internal shape the reference's chat template takes."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": parts})
    return out


def reference_chat(reference, messages: list[dict], images: list[Image.Image], max_new_tokens: int) -> str:
    """The transformers answer to OpenAI chat messages (the checkpoint's chat template, greedy)."""
    processor = reference[0]
    prompt = processor.apply_chat_template(openai_to_internal(messages), add_generation_prompt=True, tokenize=False)
    return reference_answer(reference, images, prompt, max_new_tokens)


def complete_parquet_files(folder) -> list:
    """Output files of a job whose footer is written (a file appears as soon as its writer opens it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    complete = []
    if not folder.exists():
        return complete
    for path in sorted(folder.glob("*.parquet")):
        if path.name.startswith(("_", ".")):
            continue
        try:
            pq.read_metadata(path)
            complete.append(path)
        except (pa.ArrowInvalid, OSError):
            pass
    return complete


def loopback_server(handler: type):
    """A threading HTTP server on a free loopback port, serving `handler` in a daemon thread.

    Returns the server (its port is `server.server_port`); stop it with `server.shutdown()`.
    """
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_image(payload: bytes):
    """A loopback HTTP server: /img.png answers `payload`, /to?u=URL redirects to URL, else 404.

    Returns the server (its port is `server.server_port`); stop it with `server.shutdown()`.
    """
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/to?u="):
                self.send_response(302)
                self.send_header("Location", self.path[len("/to?u="):])
                self.end_headers()
                return
            if self.path != "/img.png":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    return loopback_server(Handler)


def kill_after_first_file(args: list[str], out, log_path, sig: int | None = None) -> int:
    """Run `python -m jobs.annotate ARGS`, send it `sig` (SIGKILL by default) once its first output
    file is complete, and return its exit status."""
    import os
    import signal
    import subprocess
    import sys
    import time

    with open(log_path, "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.annotate", *args], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not complete_parquet_files(out):
        assert driver.poll() is None, open(log_path).read()[-3000:]
        assert time.monotonic() < deadline, "no output file was completed"
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL if sig is None else sig)
    return driver.wait(timeout=120)


def reference_constrained(reference, engine, images: list[Image.Image], prompt: str, constraint,
                          max_new_tokens: int) -> list[int]:
    """transformers' `generate` on the processor's inputs, masked by the same backend's logits
    processor (one of `engine`'s matchers), greedy; cut where the engine ends a constrained answer:
    at end of sequence or where its grammar is complete."""
    import torch
    from transformers import LogitsProcessorList

    from actors.constraints import GrammarProcessor

    processor, model = reference
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    masking = GrammarProcessor([engine.grammars.matcher(constraint)], engine.pad_id)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([masking]))
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    check = engine.grammars.matcher(constraint)
    for k, token in enumerate(tokens):
        check.consume_token(token)
        if token in engine.eos_ids or check.is_stopped():
            return tokens[: k + 1]
    return tokens


# A JSON schema bounded everywhere (enums, small integers, short patterned strings), so the random
# tiny model, which otherwise babbles, completes it within a small token budget.
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "maxItems": 2},
        "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False},
    },
    "required": ["colour", "count", "inner"],
    "additionalProperties": False,
}
