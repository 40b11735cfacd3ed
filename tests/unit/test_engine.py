"""The engine answers exactly as transformers does, alone or in mixed batches, on both schedulers.

Tests that only the static path has (its batch splitting on out-of-memory, a failing `generate`
call) run on `static_engine`; the continuous loop's own behaviour is in test_continuous.py.
"""

import os

import pytest
import torch

from actors import checkpoint as engine_mod
from actors.engine import Engine
from pipeline.config import EngineConfig, SamplingParams
from pipeline.preprocess import decode, prepare
from pipeline.schemas import GenerationRequest
from tests.helpers import encode, noise_image, reference_tokens

MAX_NEW = 12


def _request(engine, images: list[bytes], question: str) -> GenerationRequest:
    prepared = [prepare(data, engine.spec) for data in images]
    return GenerationRequest(
        prompt=engine.format_question(question, len(images)),
        tiles=[p.tiles for p in prepared],
        image_sizes=[p.size for p in prepared],
    )


def _mixed_rows(n: int = 8) -> list[tuple[list[bytes], str]]:
    """Rows of 1-3 images of different sizes and questions of different lengths."""
    sizes = [(64, 64), (300, 80), (40, 190), (1, 1), (640, 480), (2000, 20), (90, 33), (128, 500)]
    rows = []
    for i in range(n):
        count = 1 + i % 3
        images = [encode(noise_image(*sizes[(i + k) % len(sizes)], seed=10 * i + k)) for k in range(count)]
        question = "What is shown in this image?" + " Please answer in detail." * (i % 4)
        rows.append((images, question))
    return rows


def test_greedy_equals_transformers_one_row_at_a_time(any_engine, reference):
    engine = any_engine
    for images, question in _mixed_rows(4):
        req = _request(engine, images, question)
        got = engine.generate([req])[0]
        assert got.error is None
        pil = [decode(d) for d in images]
        expected = reference_tokens(reference, pil, req.prompt, MAX_NEW)
        assert got.token_ids == expected[: len(got.token_ids)]
        assert got.num_output_tokens == len(got.token_ids) > 0
        assert got.response == engine.tokenizer.decode(expected, skip_special_tokens=True)
        assert got.finish_reason in ("stop", "length")


def test_a_mixed_batch_equals_each_row_alone(any_engine):
    engine = any_engine
    requests = [_request(engine, images, question) for images, question in _mixed_rows(8)]
    batched = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert len({tuple(b.token_ids) for b in batched}) > 1, "answers should depend on the images"
    for b, a in zip(batched, alone):
        assert (b.num_input_tokens, b.num_image_tokens) == (a.num_input_tokens, a.num_image_tokens)


def test_a_too_long_prompt_fails_only_its_own_row(any_engine):
    engine = any_engine
    image = [encode(noise_image(50, 50))]
    good = _request(engine, image, "What is shown in this image?")
    long = _request(engine, image, "describe " * 2000)
    results = engine.generate([good, long, good])
    assert results[1].error.startswith("prompt: the prompt is") and "context" in results[1].error
    assert results[1].response is None
    assert results[0].error is None and results[2].error is None
    assert results[0].token_ids == results[2].token_ids


def test_placeholder_mismatch_is_a_row_error(any_engine):
    engine = any_engine
    req = _request(engine, [encode(noise_image(20, 20))], "What?")
    req.prompt = "[INST] <image><image> two? [/INST]"
    result = engine.generate([req])[0]
    assert result.error == "prompt: the prompt has 2 <image> placeholders but the row has 1 images"


def test_text_only_rows_batch_with_image_rows(any_engine):
    engine = any_engine
    text_only = GenerationRequest(prompt=engine.format_question("Hello there", 0))
    with_image = _request(engine, [encode(noise_image(30, 60))], "What?")
    results = engine.generate([text_only, with_image])
    assert all(r.error is None for r in results)
    assert results[0].num_image_tokens == 0 and results[1].num_image_tokens > 0
    assert results[0].token_ids == engine.generate([text_only])[0].token_ids


def test_rows_with_different_params_are_answered_with_their_own(any_engine):
    engine = any_engine
    req = _request(engine, [encode(noise_image(40, 40))], "What?")
    short = GenerationRequest(req.prompt, req.tiles, req.image_sizes, SamplingParams(max_new_tokens=3))
    results = engine.generate([req, short])
    assert results[1].num_output_tokens <= 3
    assert results[1].token_ids == results[0].token_ids[: len(results[1].token_ids)]
    assert results[1].finish_reason == "length"


def test_sampling_with_a_seed_is_repeatable(any_engine):
    engine = any_engine
    req = _request(engine, [encode(noise_image(40, 40))], "What?")
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    sampled = GenerationRequest(req.prompt, req.tiles, req.image_sizes, params)
    assert engine.generate([sampled])[0].token_ids == engine.generate([sampled])[0].token_ids


def test_oom_splits_the_batch_down_to_rows(static_engine, monkeypatch):
    """No GPU here, so out-of-memory is injected on any batch larger than two rows."""
    engine = static_engine
    requests = [_request(engine, images, q) for images, q in _mixed_rows(5)]
    expected = [r.token_ids for r in engine.generate(requests)]
    real = engine.model.generate
    sizes = []

    def generate(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(**kwargs)

    monkeypatch.setattr(engine.model, "generate", generate)
    results = engine.generate(requests)
    assert [r.token_ids for r in results] == expected
    assert all(r.error is None for r in results)
    assert sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, and the 3 -> 1 + 2


def test_other_generate_failures_mark_only_that_batch(static_engine, monkeypatch):
    engine = static_engine
    req = _request(engine, [encode(noise_image(40, 40))], "What?")

    def broken(**kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.model, "generate", broken)
    results = engine.generate([req, req])
    assert [r.error for r in results] == ["generate: RuntimeError: device lost"] * 2


def test_options_reach_from_pretrained(tiny_model, monkeypatch):
    seen = {}
    real = engine_mod.LlavaNextForConditionalGeneration.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})

    monkeypatch.setattr(engine_mod.LlavaNextForConditionalGeneration, "from_pretrained", spy)
    Engine(EngineConfig(model=tiny_model, dtype="bfloat16", attn_implementation="eager", scheduler="static"))
    assert seen["dtype"] is torch.bfloat16 and seen["attn_implementation"] == "eager"
    assert "quantization_config" not in seen
    kwargs = engine_mod.load_kwargs(EngineConfig(model=tiny_model, quantization="4bit"), torch.device("cpu"))
    q = kwargs["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype is torch.float16
    assert engine_mod.load_kwargs(EngineConfig(model="m"), torch.device("cpu"))["dtype"] is torch.float32
    assert engine_mod.resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_checkpoint_loads_and_answers(tiny_model, quantization, layer):
    import bitsandbytes as bnb

    quantized = Engine(EngineConfig(model=tiny_model, quantization=quantization, max_new_tokens=6))
    static = Engine(EngineConfig(model=tiny_model, quantization=quantization, max_new_tokens=6, scheduler="static"))
    assert quantized.scheduler == "continuous"
    layers = [m for m in quantized.model.modules() if isinstance(m, getattr(bnb.nn, layer))]
    assert len(layers) >= 16  # every linear layer of both towers and the projector
    request = _request(quantized, [encode(noise_image(60, 40))], "What?")
    result = quantized.generate([request])[0]
    quantized.close()
    assert result.error is None and result.num_output_tokens > 0 and isinstance(result.response, str)
    assert result.token_ids == static.generate([request])[0].token_ids


def test_the_vision_layers_after_the_feature_layer_are_dropped_and_features_stay_equal(tiny_model, any_engine):
    """The tower runs only up to the layer the projector reads (-2: every layer but the last), and
    an image's features are the very tensor an untouched checkpoint computes."""
    from transformers import LlavaNextForConditionalGeneration

    untouched = LlavaNextForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    full = len(untouched.model.vision_tower.encoder.layers)
    assert untouched.config.vision_feature_layer == -2
    assert len(any_engine.model.model.vision_tower.encoder.layers) == full - 1
    assert any_engine.model.config.vision_feature_layer == full - 1  # the same layer, counted from the start
    prepared = prepare(encode(noise_image(300, 80, seed=3)), any_engine.spec)
    ours = any_engine.encode_images([prepared.tiles], [prepared.size])[0]
    with torch.inference_mode():
        theirs = untouched.model.get_image_features(
            any_engine.pixel_batch([prepared.tiles]), torch.tensor([list(prepared.size)]),
            vision_feature_layer=-2, vision_feature_select_strategy=untouched.config.vision_feature_select_strategy,
        ).pooler_output[0]
    assert torch.equal(ours, theirs)
    # A list of layers keeps the deepest; an index past the tower drops nothing.
    twice = LlavaNextForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    twice.config.vision_feature_layer = [-3, -2]
    assert engine_mod.drop_unused_vision_layers(twice) == 1 and twice.config.vision_feature_layer == [full - 2, full - 1]
    twice.config.vision_feature_layer = full + 5
    assert engine_mod.drop_unused_vision_layers(twice) == 0


def test_cpu_threads_are_set_for_an_engine_on_cpu_only():
    before = torch.get_num_threads()
    try:
        engine_mod.use_cpu_threads(torch.device("cpu"), 1)
        assert torch.get_num_threads() == 1
        engine_mod.use_cpu_threads(torch.device("cuda"), 3)  # a GPU engine's host threads stay as they are
        engine_mod.use_cpu_threads(torch.device("cpu"), None)
        assert torch.get_num_threads() == 1
        engine_mod.use_cpu_threads(torch.device("cpu"), 1000)  # no more threads than cores
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
