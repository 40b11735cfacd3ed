"""The tiny checkpoint: deterministic bytes, loads through from_pretrained, all grid shapes."""

import hashlib
from pathlib import Path

from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from jobs.make_tiny_model import main, make_tiny_model


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_two_builds_are_byte_identical(tiny_model, tmp_path):
    main([str(tmp_path / "again")])
    assert _digests(Path(tiny_model)) == _digests(tmp_path / "again")
    assert sum(p.stat().st_size for p in Path(tiny_model).iterdir()) < 5 * 1024 * 1024


def test_a_different_seed_gives_different_weights(tiny_model, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert _digests(Path(tiny_model))["model.safetensors"] != _digests(other)["model.safetensors"]


def test_loads_with_auto_classes_and_has_all_grid_shapes(tiny_model):
    processor = AutoProcessor.from_pretrained(tiny_model)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_model)
    pinpoints = [tuple(p) for p in model.config.image_grid_pinpoints]
    assert any(h > w for h, w in pinpoints) and any(h < w for h, w in pinpoints)
    assert any(h == w for h, w in pinpoints)
    assert processor.num_additional_image_tokens == 1
    assert processor.tokenizer.padding_side == "left"
    assert processor.chat_template
    assert model.config.text_config.hidden_size % 64 == 0 and model.config.vision_config.hidden_size % 64 == 0
