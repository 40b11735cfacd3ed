"""Training: what the model learns from is what the engine sends it, and a seed fixes the weights."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.engine import Engine
from jobs.train_tiny import (
    IGNORE,
    Batcher,
    TrainConfig,
    load_examples,
    normalise,
    prompt_ids,
    train,
)
from pipeline import synthetic
from pipeline.config import EngineConfig
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest

STEPS = 3


def _short(out: Path) -> TrainConfig:
    return TrainConfig(out_dir=str(out), steps=STEPS, images=8, batch_size=4, warmup=2, heldout=2)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "model"
    return out, train(_short(out))


@pytest.fixture(scope="module")
def engine(trained) -> Engine:
    return Engine(EngineConfig(model=str(trained[0]), max_new_tokens=4))


def test_a_seed_gives_byte_identical_weights(trained, tmp_path):
    out, _ = trained
    train(_short(tmp_path / "again"))
    assert _digest(out / "model.safetensors") == _digest(tmp_path / "again" / "model.safetensors")


def test_checkpoint_has_processor_template_and_report(trained):
    out, report = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["config"]["steps"] == STEPS and saved["config"]["seed"] == 0
    assert set(saved["heldout_accuracy"]) == {"shape", "colour"}
    assert saved["heldout_accuracy"]["shape"]["total"] == 2
    assert report["final_loss"] == saved["final_loss"]


def test_training_sees_the_engine_prompt_and_pixels(trained, engine):
    """The first turn of a training row equals what the engine builds for the same question."""
    examples = load_examples(synthetic.train_seeds(0, 2), engine.spec)
    example = examples[1]
    question = synthetic.QUESTIONS["shape"][0]
    prompt = engine.format_question(question, 1)
    ids, _ = engine.tokenize(GenerationRequest(prompt, [example.tiles], [example.size]))
    assert prompt_ids(engine.tokenizer, engine.formatter, engine.spec, question, example.size) == ids
    assert torch.equal(normalise([example.tiles], engine.spec), engine.pixel_batch([example.tiles]))


def test_labels_cover_the_answers_and_their_ends_only(trained, engine):
    examples = load_examples(synthetic.train_seeds(0, 1), engine.spec)
    batcher = Batcher(examples, engine.processor, engine.formatter, engine.spec, seed=0)
    turns = [("describe", "Describe the image."), ("colour", "What colour is it?")]
    ids, labels = batcher.sequence(examples[0], turns)
    learnt = [t for t in labels if t != IGNORE]
    eos = engine.tokenizer.eos_token_id
    answers = engine.tokenizer.decode(learnt).split(engine.tokenizer.eos_token)
    sample = examples[0]
    assert answers == [f"A {sample.colour} {sample.shape}.", sample.colour, ""]
    assert learnt.count(eos) == 2 and ids.count(engine.image_token_id) > 0
    batch = batcher.next(3)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["pixel_values"].shape[0] == 3
    assert np.all((batch["labels"] == IGNORE).numpy() | (batch["attention_mask"] == 1).numpy())


def test_the_trained_checkpoint_answers_through_the_engine(engine, trained):
    sample = synthetic.make_sample(synthetic.HELDOUT_BASE)
    prepared = prepare(sample.encoded(), engine.spec)
    prompt = engine.format_question("What shape is in the image?", 1)
    request = GenerationRequest(prompt, [prepared.tiles], [prepared.size])
    [result] = engine.generate([request])
    assert result.error is None and result.num_output_tokens >= 1
