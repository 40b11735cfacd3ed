"""Train a tiny LLaVA-NeXT from scratch on synthetic shapes, on a CPU, and save it.

Usage: python -m jobs.train_tiny OUTDIR [--steps N] [--seed S] [--images N] [--lr LR] [--init DIR]
       [--threads T] [--vision-width W] [--vision-layers L] [--text-width W] [--text-layers L]

Training goes through the project's own image path (encoded bytes -> `pipeline.preprocess.prepare`
-> uint8 tiles -> the engine's normalisation) and the checkpoint's own chat template, so the saved
model answers through the batch job and the server exactly as it answered here. The same seed,
step count and thread count write the same weights. One thread is the default: on a shared
machine two OpenMP threads that wait on each other run many times slower than one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaNextForConditionalGeneration

from jobs.make_tiny_model import TinyArch, build_untrained
from pipeline import synthetic
from pipeline.preprocess import AnyresSpec, prepare
from pipeline.prompts import IMAGE_TOKEN, Formatter

log = logging.getLogger("jobs.train_tiny")

# Big enough tiles that a triangle's slanted edges survive the downscale of a 1000 px image, few
# enough patches per tile that a CPU step stays cheap; square, wide and tall grids. The last CLIP
# layer feeds the projector, so no vision layer is computed for nothing.
SHAPES_ARCH = TinyArch(
    crop=64,
    patch=16,
    pinpoints=((64, 128), (128, 64), (128, 128), (64, 192), (192, 64)),
    text_width=128,
    text_layers=2,
    vision_width=128,
    vision_layers=3,
    vision_feature_layer=-1,
    initializer_range=0.02,
)
ARCH_FLAGS = ("vision_width", "vision_layers", "text_width", "text_layers")
EVAL_KINDS = ("shape", "colour")
IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """One training run; saved as part of the checkpoint's training report."""

    out_dir: str
    steps: int = 3000
    seed: int = 0
    images: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    heldout: int = 60
    threads: int = 1
    init: str | None = None

    def __post_init__(self) -> None:
        if min(self.steps, self.images, self.batch_size, self.threads) < 1 or self.heldout < 0:
            raise ValueError("steps, images, batch size and threads must be positive")


@dataclass
class Example:
    """One image ready for training: its uint8 tiles, its size and the truth about it."""

    tiles: np.ndarray
    size: tuple[int, int]
    shape: str
    colour: str


def normalise(tiles: list[np.ndarray], spec: AnyresSpec) -> torch.Tensor:
    """uint8 tiles -> float `(images, max_tiles, 3, crop, crop)`, zero-padded, normalised as the engine does."""
    max_tiles = max(t.shape[0] for t in tiles)
    crop = tiles[0].shape[-1]
    mean = torch.tensor(spec.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.image_std).view(1, 3, 1, 1)
    out = torch.zeros((len(tiles), max_tiles, 3, crop, crop), dtype=torch.float32)
    for i, t in enumerate(tiles):
        out[i, : t.shape[0]] = (torch.from_numpy(t).float() * (1.0 / 255.0) - mean) / std
    return out


def prompt_ids(tokenizer, formatter: Formatter, spec: AnyresSpec, question: str, size: tuple[int, int]) -> list[int]:
    """Token ids of a one-image question, `<image>` expanded to its token count as the engine does."""
    before, after = formatter.question(question, 1).split(IMAGE_TOKEN)
    return tokenizer(before + IMAGE_TOKEN * spec.num_image_tokens(size) + after)["input_ids"]


def load_examples(seeds: range, spec: AnyresSpec) -> list[Example]:
    """Render, encode and tile every image once; steps then only index into memory."""
    examples = []
    for seed in seeds:
        sample = synthetic.make_sample(seed)
        prepared = prepare(sample.encoded(), spec)
        examples.append(Example(prepared.tiles, prepared.size, sample.shape, sample.colour))
    return examples


class Batcher:
    """Random (image, question) pairs as padded model inputs with labels on the answer only."""

    def __init__(self, examples: list[Example], processor, formatter: Formatter, spec: AnyresSpec, seed: int):
        self.examples, self.tokenizer, self.formatter, self.spec = examples, processor.tokenizer, formatter, spec
        self.rng = np.random.default_rng(seed)
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def sequence(self, example: Example, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Input ids and labels for several questions about one image, answers and ends learnt.

        The first turn is exactly the prompt the job sends; each later turn is a single-turn
        prompt without the image, after the previous answer's end of sequence. One pass of the
        vision tower so teaches every kind of answer.
        """
        ids: list[int] = []
        labels: list[int] = []
        for n, (kind, question) in enumerate(turns):
            if n == 0:
                prompt = prompt_ids(self.tokenizer, self.formatter, self.spec, question, example.size)
            else:
                prompt = self.tokenizer(self.formatter.question(question, 0), add_special_tokens=False)["input_ids"]
            reply = self.tokenizer(synthetic.answer(kind, example.shape, example.colour), add_special_tokens=False)
            reply_ids = reply["input_ids"] + [self.eos]
            ids += prompt + reply_ids
            labels += [IGNORE] * len(prompt) + reply_ids
        return ids, labels

    def turns(self) -> list[tuple[str, str]]:
        """Every kind of question once, in a random order, each in a random wording."""
        kinds = [synthetic.KINDS[k] for k in self.rng.permutation(len(synthetic.KINDS))]
        return [(k, synthetic.QUESTIONS[k][self.rng.integers(len(synthetic.QUESTIONS[k]))]) for k in kinds]

    def next(self, batch_size: int) -> dict[str, torch.Tensor]:
        picks = self.rng.integers(len(self.examples), size=batch_size)
        rows, tiles, sizes = [], [], []
        for i in picks:
            example = self.examples[i]
            rows.append(self.sequence(example, self.turns()))
            tiles.append(example.tiles)
            sizes.append(list(example.size))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), self.pad, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            attention[r, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "pixel_values": normalise(tiles, self.spec),
            "image_sizes": torch.tensor(sizes, dtype=torch.long),
        }


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.inference_mode()
def evaluate(model, processor, formatter: Formatter, spec: AnyresSpec, examples: list[Example]) -> dict:
    """Greedy answers to the canonical shape and colour questions, scored by word."""
    rows = []
    for example in examples:
        for kind in EVAL_KINDS:
            ids = prompt_ids(processor.tokenizer, formatter, spec, synthetic.QUESTIONS[kind][0], example.size)
            out = model.generate(
                input_ids=torch.tensor([ids]),
                pixel_values=normalise([example.tiles], spec),
                image_sizes=torch.tensor([list(example.size)]),
                max_new_tokens=8,
                do_sample=False,
            )
            response = processor.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
            rows.append({"kind": kind, "shape": example.shape, "colour": example.colour, "response": response})
    return synthetic.accuracy(rows)


def train(cfg: TrainConfig, arch: TinyArch = SHAPES_ARCH) -> dict:
    """Train, save the checkpoint and its report into `cfg.out_dir`, and return the report.

    Thread count and deterministic algorithms are process-wide, so they are restored on return.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, arch)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, arch: TinyArch) -> dict:
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor, model = build_untrained(arch, cfg.seed)
    if cfg.init:
        model.load_state_dict(LlavaNextForConditionalGeneration.from_pretrained(cfg.init).state_dict())
        log.info("continuing from the weights of %s", cfg.init)
    processor.save_pretrained(out)  # the spec is read from the saved files, as the job reads it
    spec = AnyresSpec.from_checkpoint(str(out))
    formatter = Formatter.from_processor(processor, model.config.text_config.model_type)
    examples = load_examples(synthetic.train_seeds(cfg.seed, cfg.images), spec)
    prepare_s = time.perf_counter() - start
    log.info("prepared %d training images in %.0f s", len(examples), prepare_s)
    batcher = Batcher(examples, processor, formatter, spec, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses: list[float] = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss = model(**batcher.next(cfg.batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - start
            log.info("step %d/%d loss %.4f (%.0f s)", step + 1, cfg.steps, np.mean(losses[-100:]), elapsed)
    model.eval()
    wall_s = time.perf_counter() - start
    model.save_pretrained(out)
    heldout = synthetic.heldout_seeds(0, cfg.heldout)
    scores = evaluate(model, processor, formatter, spec, load_examples(heldout, spec)) if cfg.heldout else {}
    report = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "out_dir"},
        "arch": asdict(arch),
        "prepare_seconds": round(prepare_s, 1),
        "train_seconds": round(wall_s, 1),
        "final_loss": float(np.mean(losses[-100:])),
        "heldout_seeds": [heldout.start, heldout.stop],
        "heldout_accuracy": scores,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    d = TrainConfig(out_dir="-")
    p = argparse.ArgumentParser(prog="python -m jobs.train_tiny", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="directory to write the trained checkpoint into")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation, data order and training images")
    p.add_argument("--images", type=int, default=d.images, help="distinct training images")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out images scored at the end")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (results depend on it)")
    p.add_argument("--init", help="continue from this checkpoint's weights (same architecture) instead of random ones")
    for name in ARCH_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(SHAPES_ARCH, name))
    args = vars(p.parse_args(argv))
    arch = dataclasses.replace(SHAPES_ARCH, **{k: args.pop(k) for k in ARCH_FLAGS})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = TrainConfig(**args)
    log.info("configuration: %s", json.dumps(asdict(cfg)))
    report = train(cfg, arch)
    print(json.dumps({k: report[k] for k in ("train_seconds", "final_loss", "heldout_accuracy")}, indent=2))
    print(f"checkpoint written to {cfg.out_dir}")


if __name__ == "__main__":
    main()
