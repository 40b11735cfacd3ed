"""A loaded LLaVA-NeXT checkpoint and what every scheduler does with it: tokenising (prompts with
their images' tokens, client text as text), fitting an answer into the context, and encoding
images with the vision tower and projector.

Plain Python with no Ray in it. Both schedulers (actors/continuous.py and actors/static.py) take a
`Checkpoint`; `Engine` (actors/engine.py) is a checkpoint with a scheduler. Tiles arrive as uint8
from CPU workers and are normalised here, on the model's device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from pipeline import prompts
from pipeline.config import EngineConfig, SamplingParams
from pipeline.preprocess import AnyresSpec, image_digest
from pipeline.schemas import GenerationRequest

if TYPE_CHECKING:
    from actors.constraints import Grammars

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` picks the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_cpu_threads(device: torch.device, threads: int | None) -> None:
    """Give torch `threads` intra-op threads when the engine computes on CPU.

    Ray starts an actor that reserves one CPU with one thread (OMP_NUM_THREADS=1); a batch job's
    CPU actor reserves one so the CPU stage always has room, but its share of the node is larger
    (see `jobs.plan.plan_resources`). Never more than the cores this process may run on: Ray's
    logical CPUs can outnumber them. The setting is the process's: the engine is all its actor runs.
    """
    if device.type != "cpu" or threads is None:
        return
    threads = min(threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if threads != torch.get_num_threads():
        log.info("engine on CPU: %d torch threads (was %d)", threads, torch.get_num_threads())
        torch.set_num_threads(threads)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_kwargs(cfg: EngineConfig, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained` that carry the engine's options."""
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(cfg.dtype, device),
        "attn_implementation": cfg.attn_implementation,
    }
    if cfg.quantization != "none":
        from transformers import BitsAndBytesConfig

        if cfg.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else device.type}
    return kwargs


def expand_images(prompt: str, image_sizes: list, spec: AnyresSpec) -> tuple[str, int]:
    """The prompt with each `<image>` repeated as many times as its image has tokens, and their total.

    Raises PromptError when the placeholders and the images disagree in number.
    """
    pieces = prompt.split(prompts.IMAGE_TOKEN)
    if len(pieces) - 1 != len(image_sizes):
        raise prompts.PromptError(
            f"the prompt has {len(pieces) - 1} {prompts.IMAGE_TOKEN} placeholders but the row has {len(image_sizes)} images"
        )
    counts = [spec.num_image_tokens(tuple(int(v) for v in s)) for s in image_sizes]
    return pieces[0] + "".join(prompts.IMAGE_TOKEN * n + p for n, p in zip(counts, pieces[1:])), sum(counts)


def expand_image_ids(ids: list[int], image_token_id: int, image_sizes: list, spec: AnyresSpec) -> tuple[list[int], int]:
    """Token ids with each image token repeated as many times as its image has tokens, and their total.

    The same ids as tokenising the prompt with its placeholders repeated (each placeholder is one
    special token, which the tokenizer splits off on its own either way).
    """
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(image_sizes):
        raise prompts.PromptError(
            f"the prompt has {found} {prompts.IMAGE_TOKEN} placeholders but the row has {len(image_sizes)} images"
        )
    counts = iter(spec.num_image_tokens(tuple(int(v) for v in s)) for s in image_sizes)
    out: list[int] = []
    total = 0
    for t in ids:
        if t == image_token_id:
            n = next(counts)
            out += [t] * n
            total += n
        else:
            out.append(t)
    return out, total


def normalise_tiles(tiles: list[np.ndarray], mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """uint8 tiles of every image -> normalised `(images, max_tiles, 3, crop, crop)` on `device`.

    Images with fewer tiles are zero-padded, as the processor does; the model drops the padding.
    """
    max_tiles = max(t.shape[0] for t in tiles)
    crop = tiles[0].shape[-1]
    out = torch.zeros((len(tiles), max_tiles, 3, crop, crop), dtype=torch.float32, device=device)
    for i, t in enumerate(tiles):
        host = np.array(t, copy=True, order="C")  # Arrow buffers are read-only; torch wants writable
        x = torch.from_numpy(host).to(device, non_blocking=True).float()
        out[i, : t.shape[0]] = (x * (1.0 / 255.0) - mean) / std
    return out.to(dtype)


def spec_tensors(spec: AnyresSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's pixel mean and std, shaped to broadcast over `(tiles, 3, h, w)`."""
    return (torch.tensor(spec.image_mean, device=device).view(1, 3, 1, 1),
            torch.tensor(spec.image_std, device=device).view(1, 3, 1, 1))


def drop_unused_vision_layers(model: LlavaNextForConditionalGeneration) -> int:
    """Cut the vision tower after the deepest layer whose output the projector reads; returns the
    layers dropped.

    LLaVA-NeXT reads a middle layer (`vision_feature_layer`, -2 in every llava-hf checkpoint), but
    the tower still runs every layer after it for nothing: one of CLIP-L's 24 layers, one of the
    bench checkpoint's 4. vLLM builds the tower only up to that layer; we drop the rest at load.
    The feature layer becomes the same layer counted from the start, so the static scheduler's
    `generate` and the continuous loop read exactly the tensor they read before.
    """
    config = model.config
    tower = model.model.vision_tower
    encoder = getattr(tower, "vision_model", tower).encoder
    total = len(encoder.layers)
    wanted = config.vision_feature_layer
    layers = [wanted] if isinstance(wanted, int) else list(wanted)
    absolute = [i if i >= 0 else total + 1 + i for i in layers]  # hidden_states[0] is the embeddings
    keep = max(absolute)
    if not 0 <= keep <= total or any(i < 0 for i in absolute):
        return 0
    encoder.layers = encoder.layers[:keep]
    config.vision_feature_layer = absolute[0] if isinstance(wanted, int) else absolute
    return total - keep


class Checkpoint:
    """A loaded checkpoint: processor, tokenizer and model, with the tokenising and image encoding
    both schedulers use."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        use_cpu_threads(self.device, cfg.cpu_threads)
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.spec = AnyresSpec.from_checkpoint(cfg.model)
        kwargs = load_kwargs(cfg, self.device)
        self.model = LlavaNextForConditionalGeneration.from_pretrained(cfg.model, **kwargs).eval()
        if "device_map" not in kwargs:
            self.model.to(self.device)
        dropped = drop_unused_vision_layers(self.model)
        if dropped:
            log.info("vision tower: %d layer(s) after the feature layer dropped", dropped)
        self.dtype = kwargs["dtype"]
        self.image_token_id = self.model.config.image_token_id
        self.context = int(self.model.config.text_config.max_position_embeddings)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()
        # Strings the tokenizer turns into control ids; typed by a client, they are text (see `tokenize_chat`).
        specials = {i: t.content for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        self.special_ids, self.special_strings = frozenset(specials), tuple(specials.values())
        self.formatter = prompts.Formatter.from_processor(
            self.processor, getattr(self.model.config.text_config, "model_type", None), cfg.prompt_format
        )
        self._mean, self._std = spec_tensors(self.spec, self.device)

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}

    @property
    def model_name(self) -> str:
        return self.cfg.model.rstrip("/").split("/")[-1]

    def format_question(self, question: str, num_images: int) -> str:
        """The formatted prompt for a question about `num_images` images (raises PromptError)."""
        return self.formatter.question(question, num_images)

    def render(self, messages: list[prompts.Message]) -> str:
        """The formatted prompt for a whole conversation (raises PromptError)."""
        return self.formatter.conversation(messages)

    def default_params(self) -> SamplingParams:
        return SamplingParams.from_engine(self.cfg)

    def decode(self, token_ids: list[int]) -> str:
        """Answer text of generated tokens (special tokens dropped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def digest(self, tiles: np.ndarray, size: tuple[int, int]) -> str:
        return image_digest(tiles, size)

    # ---- tokenising -------------------------------------------------------------------------

    def tokenize(self, request: GenerationRequest) -> tuple[list[int], int]:
        """Token ids of a request with each `<image>` expanded to its image's token count.

        Raises ValueError when placeholders and images disagree or the prompt fills the context.
        """
        if len(request.tiles) != len(request.image_sizes):
            raise prompts.PromptError(f"the row has {len(request.tiles)} tiled images but {len(request.image_sizes)} sizes")
        if request.prompt_ids is not None:
            ids, image_tokens = expand_image_ids(request.prompt_ids, self.image_token_id, request.image_sizes, self.spec)
        else:
            text, image_tokens = expand_images(request.prompt, request.image_sizes, self.spec)
            ids = self.tokenizer(text)["input_ids"]
        if len(ids) >= self.context:
            raise ValueError(f"the prompt is {len(ids)} tokens, over the model's context of {self.context}")
        return ids, image_tokens

    def tokenize_chat(self, messages: list[prompts.Message]) -> tuple[str, list[int]]:
        """The prompt of a client's conversation and its ids, one image token per image (raises PromptError).

        What a client types is text: a special token's string in a message (`</s>`, `<image>`) is
        tokenised as the characters it is, never as the control id, so a client cannot end a turn,
        forge a system prompt or add an image placeholder. Without such strings the ids are exactly
        those of the rendered prompt.
        """
        text, spans = self.formatter.conversation_literal(messages, self.special_strings)
        if not spans:
            return text, self.tokenizer(text)["input_ids"]
        encoded = self.tokenizer(text, return_offsets_mapping=True)
        literal = set(spans)
        ids: list[int] = []
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if token in self.special_ids and (start, end) in literal:
                ids += self.tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            else:
                ids.append(token)
        return text, ids

    @functools.cached_property
    def grammars(self) -> "Grammars":
        """The constraint compiler for this checkpoint, built on first use (about a second for a
        large vocabulary), its masks as wide as the lm_head."""
        from actors.constraints import Grammars

        rows = int(self.model.config.text_config.vocab_size)
        return Grammars(self.tokenizer, rows, sorted(self.eos_ids))

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes (a piece of a character stays that piece; a special token is its
        name), for log-probabilities shown per token."""
        tokenizer = self.grammars.tokenizer
        return [tokenizer.decode_bytes([int(i)]) for i in ids]

    def max_char_tokens(self) -> int:
        """The most characters one token stands for: a text of N characters has at least N / this tokens."""
        return max(1, max(len(t) for t in self.tokenizer.get_vocab()))

    def fit(self, prompt_tokens: int, params: SamplingParams) -> SamplingParams:
        """The request's options with its answer cut to what the context leaves after the prompt."""
        room = self.context - prompt_tokens
        if params.max_new_tokens <= room:
            return params
        return dataclasses.replace(params, max_new_tokens=max(1, room))

    # ---- images -----------------------------------------------------------------------------

    def pixel_batch(self, tiles: list[np.ndarray]) -> torch.Tensor:
        """uint8 tiles of every image -> normalised `(images, max_tiles, 3, crop, crop)` on device."""
        return normalise_tiles(tiles, self._mean, self._std, self.device, self.dtype)

    def encode_images(self, tiles: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Packed features of each image (one row per image token, newlines included)."""
        config = self.model.config
        with torch.inference_mode():
            features = self.model.model.get_image_features(
                self.pixel_batch(tiles),
                torch.tensor([list(s) for s in sizes], dtype=torch.long, device=self.device),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            ).pooler_output
        return list(features)
