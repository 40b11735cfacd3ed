"""Train a tiny LLaVA-NeXT from scratch on synthetic shapes, on a CPU, and save it.

Usage: python -m jobs.train_tiny OUTDIR [--steps N] [--seed S] [--vision-steps N] [--images N] [--lr LR]
       [--threads T] [--workers W] [--eval-every N] [--probe-weight W] [--vision-width W] ...

Two stages, every image freshly rendered: a vision stage teaches the CLIP tower shapes and colours
through a training-only head on each image's base tile (LLaVA's tower comes pretrained; ours does
not), then the whole model learns to answer, with that head's loss kept on. Training goes through
the project's own image path (encoded bytes -> `pipeline.preprocess.prepare` -> uint8 tiles ->
the engine's normalisation) and the checkpoint's own chat template, so the saved
model answers through the batch job and the server exactly as it answered here. The same seed,
step count and thread count write the same weights. One thread is the default: on a shared
machine two OpenMP threads that wait on each other run many times slower than one, and loader
workers render the next batches meanwhile.
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
import torch.nn.functional as F

from actors.checkpoint import expand_images, normalise_tiles, spec_tensors
from jobs import synthetic
from jobs.make_tiny_model import TinyArch, build_untrained
from pipeline.preprocess import AnyresSpec, prepare
from pipeline.prompts import Formatter

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
TRUTH = "truth"  # the batch entry the vision probe learns from; not a model input


@dataclass(frozen=True)
class TrainConfig:
    """One training run; saved as part of the checkpoint's training report."""

    out_dir: str
    steps: int = 3000
    seed: int = 0
    images: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    heldout: int = 100
    threads: int = 1
    workers: int = 2
    eval_every: int = 500
    probe_weight: float = 1.0
    vision_steps: int = 1000
    vision_batch_size: int = 32

    def __post_init__(self) -> None:
        positive = (self.steps, self.batch_size, self.vision_batch_size, self.threads)
        if min(positive) < 1 or (self.images is not None and self.images < 1):
            raise ValueError("steps, images, batch size and threads must be positive")
        if min(self.heldout, self.workers, self.eval_every, self.probe_weight, self.vision_steps) < 0:
            raise ValueError("held-out images, workers, the evaluation interval, the probe weight "
                             "and vision steps cannot be negative")
        if self.draws > synthetic.TRAIN_STRIDE and self.images is None:
            raise ValueError(f"at most {synthetic.TRAIN_STRIDE} fresh images per run; pass --images")

    @property
    def draws(self) -> int:
        """Images drawn in a run: the vision stage's, then the answer stage's."""
        return self.vision_steps * self.vision_batch_size + self.steps * self.batch_size

    def image_seed(self, draw: int, rng: np.random.Generator) -> int:
        """The image seed of the run's `draw`-th image: fresh every time, or one of `images` fixed ones."""
        first = synthetic.train_seeds(self.seed, 0).start
        if self.images is None:
            return first + draw
        return first + int(rng.integers(self.images))


@dataclass
class Example:
    """One image ready for training: its uint8 tiles, its size and the truth about it."""

    tiles: np.ndarray
    size: tuple[int, int]
    shape: str
    colour: str


def normalise(tiles: list[np.ndarray], spec: AnyresSpec) -> torch.Tensor:
    """uint8 tiles -> float `(images, max_tiles, 3, crop, crop)` on CPU, with the engine's own code."""
    cpu = torch.device("cpu")
    mean, std = spec_tensors(spec, cpu)
    return normalise_tiles(tiles, mean, std, cpu, torch.float32)


def prompt_ids(tokenizer, formatter: Formatter, spec: AnyresSpec, question: str, size: tuple[int, int]) -> list[int]:
    """Token ids of a one-image question, `<image>` expanded by the engine's own code."""
    return tokenizer(expand_images(formatter.question(question, 1), [size], spec)[0])["input_ids"]


def load_example(seed: int, spec: AnyresSpec) -> Example:
    """Render one sample, encode it as a file and tile it through the job's own `prepare`."""
    sample = synthetic.make_sample(seed)
    prepared = prepare(sample.encoded(), spec)
    return Example(prepared.tiles, prepared.size, sample.shape, sample.colour)


def load_examples(seeds: range, spec: AnyresSpec) -> list[Example]:
    """Several examples, in seed order."""
    return [load_example(seed, spec) for seed in seeds]


def draw_examples(
    cfg: TrainConfig, spec: AnyresSpec, first: int, count: int, rng: np.random.Generator
) -> list[Example]:
    """The run's draws `first` .. `first + count - 1`, rendered and tiled."""
    return [load_example(cfg.image_seed(first + j, rng), spec) for j in range(count)]


def base_tiles(examples: list[Example], spec: AnyresSpec) -> torch.Tensor:
    """Each example's base tile (tile 0, the whole image at crop size), normalised: the probe's input."""
    return normalise([e.tiles[:1] for e in examples], spec)


class Batches(torch.utils.data.Dataset):
    """Batch `k` of a run as padded model inputs, labels on the answers only, fixed by (seed, k).

    Every batch renders its own images, so a long run never sees an image twice and cannot learn
    the training set by heart. Since a batch depends on nothing but its index, a loader worker can
    build the next batches on another core and the weights stay the same with any worker count.
    """

    def __init__(self, cfg: TrainConfig, processor, formatter: Formatter, spec: AnyresSpec):
        self.cfg, self.tokenizer, self.formatter, self.spec = cfg, processor.tokenizer, formatter, spec
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def __len__(self) -> int:
        return self.cfg.steps

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

    @staticmethod
    def turns(rng: np.random.Generator) -> list[tuple[str, str]]:
        """Every kind of question once, in a random order, each in a random wording."""
        kinds = [synthetic.KINDS[k] for k in rng.permutation(len(synthetic.KINDS))]
        return [(k, synthetic.QUESTIONS[k][rng.integers(len(synthetic.QUESTIONS[k]))]) for k in kinds]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1, step])
        first = cfg.vision_steps * cfg.vision_batch_size + step * cfg.batch_size
        examples = draw_examples(cfg, self.spec, first, cfg.batch_size, rng)
        return self.collate(examples, [self.turns(rng) for _ in examples])

    def collate(self, examples: list[Example], turns: list[list[tuple[str, str]]]) -> dict[str, torch.Tensor]:
        """Right-padded ids, labels and mask, with the zero-padded pixels of every example."""
        rows = [self.sequence(e, t) for e, t in zip(examples, turns)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            attention[r, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "pixel_values": normalise([e.tiles for e in examples], self.spec),
            "image_sizes": torch.tensor([list(e.size) for e in examples], dtype=torch.long),
            TRUTH: VisionProbe.truth(examples),
        }


class BaseTiles(torch.utils.data.Dataset):
    """Batch `k` of the vision stage: the base tiles of fresh images and their truth.

    The base tile is the whole image at crop size; that is all the vision stage learns from, so
    it costs a fraction of a full step and draws images faster than the answer stage.
    """

    def __init__(self, cfg: TrainConfig, spec: AnyresSpec):
        self.cfg, self.spec = cfg, spec

    def __len__(self) -> int:
        return self.cfg.vision_steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, 0, step])
        size = self.cfg.vision_batch_size
        examples = draw_examples(self.cfg, self.spec, step * size, size, rng)
        return {"pixel_values": base_tiles(examples, self.spec), TRUTH: VisionProbe.truth(examples)}


class VisionProbe(torch.nn.Module):
    """A training-only head that names shape and colour from the base tile's vision features.

    The answer loss alone reaches the vision tower through the projector and the language model;
    on its own it left shapes at chance for thousands of steps while colours were learnt at once.
    LLaVA starts from a pretrained CLIP; ours starts from random weights, so a vision stage first
    trains the tower with this head, which reads the features the projector reads (the patch
    tokens of the feature layer, averaged), and the head stays on as a second loss while the
    answers are learnt. It is never saved: the checkpoint is the plain model.
    """

    def __init__(self, model, seed: int):
        super().__init__()
        self.tower = model.model.vision_tower
        self.layer = model.config.vision_feature_layer
        generator = torch.Generator().manual_seed(seed)
        width = model.config.vision_config.hidden_size
        self.head = torch.nn.Linear(width, len(synthetic.SHAPES) + len(synthetic.COLOURS))
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * width**-0.5)
            self.head.bias.zero_()

    @staticmethod
    def classes(example: Example) -> tuple[int, int]:
        return synthetic.SHAPES.index(example.shape), list(synthetic.COLOURS).index(example.colour)

    @staticmethod
    def truth(examples: list[Example]) -> torch.Tensor:
        """The (shape, colour) class pairs of a batch, as the probe's loss takes them."""
        return torch.tensor([VisionProbe.classes(e) for e in examples], dtype=torch.long)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Shape logits then colour logits; tile 0 of every image is its base tile."""
        hidden = self.tower(pixel_values[:, 0], output_hidden_states=True).hidden_states[self.layer]
        return self.head(hidden[:, 1:].mean(1))  # without CLS, as the projector is fed

    def split_logits(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape logits and colour logits, apart."""
        logits = self.logits(pixel_values)
        shapes = len(synthetic.SHAPES)
        return logits[:, :shapes], logits[:, shapes:]

    def forward(self, pixel_values: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the shape plus that of the colour."""
        shape, colour = self.split_logits(pixel_values)
        return F.cross_entropy(shape, truth[:, 0]) + F.cross_entropy(colour, truth[:, 1])

    @torch.inference_mode()
    def accuracy(self, examples: list[Example], spec: AnyresSpec) -> dict[str, float]:
        """How often the head names the shape and the colour of held-out images."""
        shape, colour = self.split_logits(base_tiles(examples, spec))
        truth = self.truth(examples)
        return {
            "shape": round((shape.argmax(1) == truth[:, 0]).float().mean().item(), 4),
            "colour": round((colour.argmax(1) == truth[:, 1]).float().mean().item(), 4),
        }


def learning_rate(step: int, steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at `steps`."""
    warmup = min(cfg.warmup, steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
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
    processor.save_pretrained(out)  # the spec is read from the saved files, as the job reads it
    spec = AnyresSpec.from_checkpoint(str(out))
    formatter = Formatter.from_processor(processor, model.config.text_config.model_type)
    heldout = synthetic.heldout_seeds(0, cfg.heldout)
    heldout_examples = load_examples(heldout, spec)
    probe = VisionProbe(model, cfg.seed)
    vision = _vision_stage(cfg, probe, spec, heldout_examples) if cfg.vision_steps else {}
    losses, probe_losses, curve = _answer_stage(cfg, model, probe, processor, formatter, spec, heldout_examples)
    model.eval()
    wall_s = time.perf_counter() - start
    model.save_pretrained(out)
    scores = _score(model, processor, formatter, spec, heldout_examples) if heldout_examples else {}
    report = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "out_dir"},
        "arch": asdict(arch),
        "train_seconds": round(wall_s, 1),
        "vision_stage": vision,
        "final_loss": float(np.mean(losses[-100:])),
        "final_probe_loss": float(np.mean(probe_losses[-100:])),
        "heldout_seeds": [heldout.start, heldout.stop],
        "heldout_accuracy": scores,
        "heldout_curve": curve,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _answer_stage(cfg: TrainConfig, model, probe: VisionProbe, processor, formatter: Formatter, spec: AnyresSpec,
                  heldout: list[Example]) -> tuple[list[float], list[float], list[dict]]:
    """Train the whole model on answers (plus the probe's loss); the per-step losses and the held-out curve."""
    start = time.perf_counter()
    loader = _loader(Batches(cfg, processor, formatter, spec), cfg)
    params = list(model.parameters()) + (list(probe.head.parameters()) if cfg.probe_weight else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses: list[float] = []
    probe_losses: list[float] = []
    curve: list[dict] = []
    for step, batch in enumerate(loader):
        truth = batch.pop(TRUTH)
        answer_loss = model(**batch).loss
        probe_loss = probe(batch["pixel_values"], truth) if cfg.probe_weight else torch.zeros(())
        _optimise(optimizer, params, answer_loss + cfg.probe_weight * probe_loss, learning_rate(step, cfg.steps, cfg))
        losses.append(answer_loss.item())
        probe_losses.append(probe_loss.item())
        done = step + 1
        if done % 100 == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - start
            log.info(
                "step %d/%d answer loss %.4f probe loss %.4f (%.0f s)",
                done, cfg.steps, np.mean(losses[-100:]), np.mean(probe_losses[-100:]), elapsed,
            )
        if cfg.eval_every and heldout and done % cfg.eval_every == 0 and done < cfg.steps:
            scores = _score(model, processor, formatter, spec, heldout)
            curve.append({"step": done, **scores})
            log.info("step %d held-out accuracy %s", done, json.dumps(scores))
    return losses, probe_losses, curve


def _optimise(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, lr: float) -> None:
    """One AdamW step at `lr` on `loss`, gradients clipped to norm 1 (both stages step alike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def _loader(dataset: torch.utils.data.Dataset, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """Batches in index order, built ahead by `cfg.workers` processes (or inline with none)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None
    )


def _vision_stage(cfg: TrainConfig, probe: VisionProbe, spec: AnyresSpec, heldout: list[Example]) -> dict:
    """Train the vision tower and the probe's head on base tiles; the rest of the model waits."""
    start = time.perf_counter()
    params = list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    probe.train()
    losses: list[float] = []
    for step, batch in enumerate(_loader(BaseTiles(cfg, spec), cfg)):
        loss = probe(batch["pixel_values"], batch[TRUTH])
        _optimise(optimizer, params, loss, learning_rate(step, cfg.vision_steps, cfg))
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.vision_steps:
            log.info("vision step %d/%d probe loss %.4f (%.0f s)", step + 1, cfg.vision_steps,
                     np.mean(losses[-100:]), time.perf_counter() - start)
    probe.eval()
    report = {
        "seconds": round(time.perf_counter() - start, 1),
        "final_probe_loss": float(np.mean(losses[-100:])),
        "heldout_probe_accuracy": probe.accuracy(heldout, spec) if heldout else {},
    }
    log.info("vision stage done: %s", json.dumps(report))
    return report


def _score(model, processor, formatter: Formatter, spec: AnyresSpec, examples: list[Example]) -> dict[str, float]:
    """Held-out accuracy per question kind, the model left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        scores = evaluate(model, processor, formatter, spec, examples)
    finally:
        model.train(was_training)
    return {kind: round(v["accuracy"], 4) for kind, v in scores.items()}


def main(argv: list[str] | None = None) -> None:
    d = TrainConfig(out_dir="-")
    p = argparse.ArgumentParser(prog="python -m jobs.train_tiny", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="directory to write the trained checkpoint into")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation, data order and training images")
    p.add_argument("--images", type=int, default=d.images,
                   help="draw from this many fixed training images (default: a fresh image every draw)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--heldout", type=int, default=d.heldout, help="held-out images scored at the end")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (results depend on it)")
    p.add_argument("--workers", type=int, default=d.workers, help="processes rendering batches ahead (0: inline)")
    p.add_argument("--probe-weight", type=float, default=d.probe_weight,
                   help="weight of the vision tower's direct shape/colour loss (0: answers only)")
    p.add_argument("--vision-steps", type=int, default=d.vision_steps,
                   help="steps of the vision stage (base tiles, shape/colour labels) before the answers")
    p.add_argument("--vision-batch-size", type=int, default=d.vision_batch_size)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="score the held-out images every N steps")
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
