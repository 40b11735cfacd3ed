"""Suite `gpu`: the full-size llava-v1.6-mistral-7b architecture with random bfloat16 weights.

No weights can be downloaded, and speed does not depend on their values, so the architecture is
built from `llava_v16_mistral_7b_config.json` and saved once as a checkpoint the project's own
`Engine` loads (with the tiny checkpoint's tokenizer: text ids do not change the cost, the 2,928
image tokens of a 672x672 image dominate the prompt). Prefill and decode are compared with the
device's roofline; the pipeline figure overlaps our CPU stage with generation as the batch job
does. Variants (Flash-Attention 2, 4-bit) run only where their packages are installed.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from jobs.bench.common import Plot, SuiteResult, Target
from jobs.bench.images import photo_jpeg

log = logging.getLogger(__name__)

CONFIG_7B = Path(__file__).with_name("llava_v16_mistral_7b_config.json")
IMAGE = (672, 672)
QUESTION = "What is shown in this image?"
# Dense bfloat16 tensor-core FLOP/s and memory bytes/s from the vendors' data sheets.
PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.039e12),
    "L40S": (362e12, 0.864e12),
}


def peaks(name: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of the first data-sheet entry whose key is in the device name."""
    return next((v for k, v in PEAKS.items() if k in name), None)


def save_checkpoint(out: Path, device: str = "cuda") -> str:
    """Random bfloat16 weights of the 7B architecture, saved with a processor configured like the 7B's."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    from jobs.make_tiny_model import CHAT_TEMPLATE, ImageProcessor, build_tokenizer

    tokenizer = build_tokenizer()
    config = LlavaNextConfig.from_json_file(CONFIG_7B)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    crop = config.vision_config.image_size
    processor = LlavaNextProcessor(
        image_processor=ImageProcessor(
            size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
            image_grid_pinpoints=config.image_grid_pinpoints, do_convert_rgb=True,
        ),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor.save_pretrained(out)
    model.save_pretrained(out)
    del model
    return str(out)


def cuda_seconds(fn) -> float:
    """Wall seconds of `fn` including the GPU work it queued."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def requests(engine, images: list[bytes]) -> list:
    from pipeline.preprocess import prepare
    from pipeline.schemas import GenerationRequest

    prompt = engine.format_question(QUESTION, 1)
    prepared = [prepare(data, engine.spec) for data in images]
    return [GenerationRequest(prompt, [p.tiles], [p.size]) for p in prepared]


def text_matmul_params(model) -> int:
    """Parameters of the language model that take part in a matmul per token (all but the embedding)."""
    text = model.config.text_config
    return sum(p.numel() for p in model.model.language_model.parameters()) - text.vocab_size * text.hidden_size + \
        model.lm_head.weight.numel()


def flops_per_prefill(model, tokens: int, tiles: int) -> float:
    """Matmul FLOPs of one prompt: 2 per parameter per token in each tower, plus causal attention."""
    text, vision = model.config.text_config, model.config.vision_config
    vit_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    vit_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    attention = 4 * text.num_hidden_layers * tokens * tokens * text.hidden_size / 2
    vit_attention = 4 * vision.num_hidden_layers * tiles * vit_tokens**2 * vision.hidden_size
    return 2 * text_matmul_params(model) * tokens + 2 * vit_params * tiles * vit_tokens + attention + vit_attention


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: the language model and its head (not the vision tower)."""
    parts = [*model.model.language_model.parameters(), model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in parts)


def measure_model(engine, images: list[bytes], batch: int, decode_steps: int, peak: tuple[float, float] | None) -> dict[str, Any]:
    """Prefill tokens/s and decode ms/step of one loaded engine, with their roofline fractions."""
    reqs = requests(engine, images[:batch])
    ids = [engine.tokenize(r)[0] for r in reqs]
    tokens = len(ids[0])
    inputs = {
        "input_ids": torch.tensor(ids, device=engine.device),
        "attention_mask": torch.ones((batch, tokens), dtype=torch.long, device=engine.device),
        "pixel_values": engine.pixel_batch([r.tiles[0] for r in reqs]),
        "image_sizes": torch.tensor([list(r.image_sizes[0]) for r in reqs], device=engine.device),
    }
    model = engine.model
    with torch.inference_mode():
        model(**inputs)
        prefill = statistics.median(cuda_seconds(lambda: model(**inputs)) for _ in range(5))

        def generate(n: int) -> None:
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=engine.pad_id)

        step = (cuda_seconds(lambda: generate(decode_steps + 1)) - cuda_seconds(lambda: generate(1))) / decode_steps
    tiles = reqs[0].tiles[0].shape[0]
    out = {
        "batch": batch, "prompt_tokens": tokens, "prefill_s": prefill,
        "prefill_tokens_per_s": batch * tokens / prefill, "decode_ms_per_step": 1000 * step,
    }
    if peak is not None:
        flops = batch * flops_per_prefill(model, tokens, tiles)
        text = model.config.text_config
        kv = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
        step_bytes = decode_weight_bytes(model) + batch * kv * (tokens + decode_steps) * 2
        out["prefill_roofline_fraction"] = flops / prefill / peak[0]
        out["decode_roofline_ms"] = 1000 * step_bytes / peak[1]
        out["decode_roofline_fraction"] = out["decode_roofline_ms"] / out["decode_ms_per_step"]
    return out


def measure_pipeline(engine, images: list[bytes], batch: int, workers: int) -> dict[str, float]:
    """Images/s with CPU threads preparing the next batches while the GPU generates, and the share of
    the wall time spent inside `Engine.generate` (the GPU is idle only while it waits for input)."""
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    busy = 0.0
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for reqs in pool.map(lambda chunk: requests(engine, chunk), chunks):
            busy += cuda_seconds(lambda: engine.generate(reqs))
    wall = time.perf_counter() - start
    return {"images": len(images), "wall_s": wall, "images_per_s": len(images) / wall, "gpu_busy_share": busy / wall}


def measure_schedulers(engine, images: list[bytes], batch: int, steps: int) -> dict[str, Any]:
    """The continuous loop against static batches of `batch` on the same rows (answers cut at 8 to
    `steps` tokens), on one engine: rows/s each and how many rows got equal tokens."""
    from dataclasses import replace

    reqs = requests(engine, images)
    for i, r in enumerate(reqs):
        r.params = replace(engine.default_params(), max_new_tokens=8 + (37 * i) % max(1, steps - 7))
    engine.generate(reqs[:2])
    static_s = cuda_seconds(lambda: [engine.generate_static(reqs[k : k + batch]) for k in range(0, len(reqs), batch)])
    static = [res for k in range(0, len(reqs), batch) for res in engine.generate_static(reqs[k : k + batch])]
    results: list = []
    continuous_s = cuda_seconds(lambda: results.extend(engine.generate(reqs)))
    equal = sum(a.token_ids == b.token_ids for a, b in zip(static, results))
    return {"rows": len(reqs), "static_s": static_s, "continuous_s": continuous_s, "tokens_equal": equal,
            "speedup": static_s / continuous_s, "engine": engine.stats()}


def variants() -> list[tuple[str, str, str]]:
    """(label, attention, quantization) for bfloat16 sdpa and the variants whose packages exist."""
    out = [("bf16 sdpa", "sdpa", "none")]
    if importlib.util.find_spec("flash_attn") is not None:
        out.append(("bf16 flash-attn 2", "flash_attention_2", "none"))
    if importlib.util.find_spec("bitsandbytes") is not None:
        out.append(("4-bit nf4 sdpa", "sdpa", "4bit"))
    return out


def skipped(reason: str) -> SuiteResult:
    log.warning("gpu suite skipped: %s", reason)
    return SuiteResult(suite="gpu", title="GPU: llava-v1.6-mistral-7b architecture (random weights)",
                       header=[], rows=[], ratios={}, skipped=reason)


def run(quick: bool) -> SuiteResult:
    if not torch.cuda.is_available():
        return skipped("no CUDA device on this machine; run it where `torch.cuda.is_available()` is true")
    from actors.engine import Engine
    from pipeline.config import EngineConfig

    batch, steps, count = (2, 8, 8) if quick else (8, 64, 64)
    name = torch.cuda.get_device_name(0)
    peak = peaks(name)
    images = [photo_jpeg(*IMAGE, seed=i) for i in range(count)]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = save_checkpoint(Path(tmp))
        for label, attn, quant in variants():
            engine = Engine(EngineConfig(model=model_dir, dtype="bfloat16", attn_implementation=attn,
                                         quantization=quant, max_new_tokens=steps, device="cuda", scheduler="static"))
            results[label] = measure_model(engine, images, batch, steps, peak)
            log.info("%s: %s", label, results[label])
            del engine
            torch.cuda.empty_cache()
        # The continuous loop holds a KV cache of its own: measured on an engine of its own.
        engine = Engine(EngineConfig(model=model_dir, dtype="bfloat16", max_new_tokens=steps, device="cuda",
                                     kv_cache_mb=16384))
        results["bf16 sdpa"]["pipeline"] = measure_pipeline(engine, images, batch, workers=8)
        results["bf16 sdpa"]["schedulers"] = measure_schedulers(engine, images, batch, steps)
        engine.close()
    base = results["bf16 sdpa"]
    ratios = {"ratio_gpu_busy_share": base["pipeline"]["gpu_busy_share"],
              "speedup_continuous_over_static": base["schedulers"]["speedup"]}
    if peak is not None:
        ratios["ratio_prefill_over_roofline"] = base["prefill_roofline_fraction"]
        ratios["ratio_decode_roofline_over_measured"] = base["decode_roofline_fraction"]
    for label, res in results.items():
        if label != "bf16 sdpa":
            key = label.split()[1] if label.startswith("bf16") else "4bit"
            ratios[f"speedup_prefill_{key}_over_sdpa".replace("-", "_")] = res["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
            ratios[f"speedup_decode_{key}_over_sdpa".replace("-", "_")] = base["decode_ms_per_step"] / res["decode_ms_per_step"]
    rows = [[label, res["prefill_tokens_per_s"], res.get("prefill_roofline_fraction", "-"), res["decode_ms_per_step"],
             res.get("decode_roofline_ms", "-"), res.get("decode_roofline_fraction", "-")] for label, res in results.items()]
    peak_note = (f"peaks used for {name}: {peak[0] / 1e12:.0f} TFLOP/s dense bf16, {peak[1] / 1e12:.2f} TB/s"
                 if peak else f"no data-sheet peaks known for {name}; roofline fractions omitted")
    return SuiteResult(
        suite="gpu", title=f"GPU: llava-v1.6-mistral-7b architecture, random bf16 weights, {IMAGE[0]}x{IMAGE[1]} images",
        header=["variant", "prefill tokens/s", "prefill / roofline", "decode ms/step", "roofline ms/step", "roofline / decode"],
        rows=rows, ratios=ratios,
        targets=[
            Target("GPU busy share in the pipeline", base["pipeline"]["gpu_busy_share"], 0.9, True),
            Target("continuous / static rows/s, mixed answer lengths", base["schedulers"]["speedup"], 2.0, True),
        ],
        raw={"device": name, "results": results, "batch": batch, "decode_steps": steps},
        notes=[peak_note, f"batch {batch}; pipeline: {count} images, {batch} per call, 8 CPU threads preparing ahead, "
               "continuous scheduler", f"schedulers: the same {count} rows with answers cut at 8-{steps} tokens; "
               f"tokens equal on {base['schedulers']['tokens_equal']}/{base['schedulers']['rows']} rows"],
        plot=Plot(title="Prefill tokens/s by variant", ylabel="tokens/s", categories=list(results),
                  series={"prefill tokens/s": [r["prefill_tokens_per_s"] for r in results.values()]}),
    )
