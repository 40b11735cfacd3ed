"""Training: what the model learns from is what the engine sends it, and a seed fixes the weights."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.engine import Engine
from jobs.make_tiny_model import build_untrained
from jobs.train_tiny import (
    IGNORE,
    SHAPES_ARCH,
    TRUTH,
    BaseTiles,
    Batches,
    TrainConfig,
    VisionProbe,
    load_examples,
    normalise,
    train,
)
from jobs import synthetic
from pipeline.config import EngineConfig
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest

STEPS = 3


def _short(out: Path, **changes) -> TrainConfig:
    base = {"steps": STEPS, "batch_size": 4, "warmup": 2, "heldout": 2, "workers": 0, "eval_every": 0,
            "vision_steps": 2, "vision_batch_size": 3}
    return TrainConfig(out_dir=str(out), **{**base, **changes})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "model"
    return out, train(_short(out))


@pytest.fixture(scope="module")
def engine(trained) -> Engine:
    return Engine(EngineConfig(model=str(trained[0]), max_new_tokens=4))


def test_a_seed_gives_byte_identical_weights_with_any_loader_workers(trained, tmp_path):
    out, _ = trained
    train(_short(tmp_path / "again", workers=1))
    assert _digest(out / "model.safetensors") == _digest(tmp_path / "again" / "model.safetensors")
    train(_short(tmp_path / "other", seed=1))
    assert _digest(out / "model.safetensors") != _digest(tmp_path / "other" / "model.safetensors")


def test_every_draw_is_a_fresh_image_unless_images_are_fixed(tmp_path):
    fresh = _short(tmp_path, steps=5, batch_size=4, images=None)
    rng = np.random.default_rng(0)
    seeds = [fresh.image_seed(draw, rng) for draw in range(fresh.draws)]
    assert len(set(seeds)) == len(seeds) == 2 * 3 + 5 * 4
    assert set(seeds) <= set(synthetic.train_seeds(0, synthetic.TRAIN_STRIDE))
    assert len(BaseTiles(fresh, None)) == fresh.vision_steps == 2
    fixed = _short(tmp_path, images=5)
    drawn = {fixed.image_seed(draw, rng) for draw in range(200)}
    assert drawn == set(synthetic.train_seeds(0, 5))
    with pytest.raises(ValueError, match="fresh images"):
        TrainConfig(out_dir="-", steps=synthetic.TRAIN_STRIDE, batch_size=2)


def test_the_vision_stage_learns_from_base_tiles_with_their_truth(trained, engine):
    cfg = _short(trained[0])
    batch = BaseTiles(cfg, engine.spec)[1]
    rng = np.random.default_rng(0)
    examples = load_examples(range(cfg.image_seed(3, rng), cfg.image_seed(6, rng)), engine.spec)
    assert torch.equal(batch["pixel_values"], normalise([e.tiles[:1] for e in examples], engine.spec))
    assert batch[TRUTH].tolist() == [list(VisionProbe.classes(e)) for e in examples]
    assert batch[TRUTH].tolist() == [
        [synthetic.SHAPES.index(e.shape), list(synthetic.COLOURS).index(e.colour)] for e in examples
    ]


def test_checkpoint_has_processor_template_and_report(trained):
    out, report = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["config"]["steps"] == STEPS and saved["config"]["seed"] == 0
    assert set(saved["heldout_accuracy"]) == {"shape", "colour"}
    assert all(0.0 <= v <= 1.0 for v in saved["heldout_accuracy"].values())
    first, stop = saved["heldout_seeds"]
    assert stop - first == 2 and first not in synthetic.train_seeds(0, synthetic.TRAIN_STRIDE)
    assert report["final_loss"] == saved["final_loss"] and saved["final_probe_loss"] > 0


def test_the_vision_probe_trains_the_tower_but_is_not_saved(trained, tmp_path):
    """The probe's head stays out of the checkpoint, and its loss does reach the vision tower."""
    out, _ = trained
    _, fresh = build_untrained(SHAPES_ARCH, 0)
    fresh.save_pretrained(tmp_path / "fresh")
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "fresh" / "model.safetensors"))
    train(_short(tmp_path / "answers-only", probe_weight=0.0))
    without = load_file(tmp_path / "answers-only" / "model.safetensors")
    tower = [k for k in saved if "vision_tower" in k]
    assert tower and any(not torch.equal(saved[k], without[k]) for k in tower)


def test_labels_cover_the_answers_and_their_ends_only(trained, engine):
    examples = load_examples(synthetic.train_seeds(0, 1), engine.spec)
    batches = Batches(_short(trained[0]), engine.processor, engine.formatter, engine.spec)
    turns = [("describe", "Describe the image."), ("colour", "What colour is it?")]
    ids, labels = batches.sequence(examples[0], turns)
    learnt = [t for t in labels if t != IGNORE]
    eos = engine.tokenizer.eos_token_id
    answers = engine.tokenizer.decode(learnt).split(engine.tokenizer.eos_token)
    sample = examples[0]
    assert answers == [f"A {sample.colour} {sample.shape}.", sample.colour, ""]
    assert learnt.count(eos) == 2 and ids.count(engine.image_token_id) > 0
    batch = batches[1]
    assert batch["input_ids"].shape == batch["labels"].shape and batch["pixel_values"].shape[0] == 4
    assert batch[TRUTH].shape == (4, 2)
    assert all(torch.equal(batch[k], batches[1][k]) for k in batch)
    assert np.all((batch["labels"] == IGNORE).numpy() | (batch["attention_mask"] == 1).numpy())


def test_the_trained_checkpoint_answers_through_the_engine(engine, trained):
    sample = synthetic.make_sample(synthetic.HELDOUT_BASE)
    prepared = prepare(sample.encoded(), engine.spec)
    prompt = engine.format_question("What shape is in the image?", 1)
    request = GenerationRequest(prompt, [prepared.tiles], [prepared.size])
    [result] = engine.generate([request])
    assert result.error is None and result.num_output_tokens >= 1
