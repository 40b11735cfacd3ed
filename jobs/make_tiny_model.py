"""Write a tiny random LLaVA-NeXT checkpoint, offline and byte-for-byte deterministic.

Usage: python -m jobs.make_tiny_model OUTDIR [--seed S]

The checkpoint has the real architecture (CLIP vision tower, projector, Mistral language model,
anyres with wide, tall and square grids) at a few hidden units, a byte-level BPE tokenizer trained
here on a fixed corpus, and a chat template in the Mistral layout. Tests and the demo load it
through the same `from_pretrained` code as a full-size checkpoint. Hidden sizes are multiples of
64 so that bitsandbytes can quantize every linear layer.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)

try:
    from transformers import LlavaNextImageProcessorPil as ImageProcessor
except ImportError:  # older transformers name the PIL processor plainly
    from transformers import LlavaNextImageProcessor as ImageProcessor

log = logging.getLogger(__name__)

CROP = 32
PATCH = 8
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass(frozen=True)
class TinyArch:
    """Sizes of a tiny checkpoint; the defaults are the random test model, larger ones train.

    `vision_feature_layer` -2 is LLaVA's choice (the last CLIP layer then goes unused);
    `initializer_range` 0.1 makes an untrained model's greedy answers differ between images.
    """

    crop: int = CROP
    patch: int = PATCH
    pinpoints: tuple[tuple[int, int], ...] = tuple(tuple(p) for p in PINPOINTS)
    text_width: int = 64
    text_layers: int = 2
    vision_width: int = 64
    vision_layers: int = 2
    vision_feature_layer: int = -2
    initializer_range: float = 0.1

    def __post_init__(self) -> None:
        if self.text_width % 64 or self.vision_width % 64:
            raise ValueError("hidden sizes must be multiples of 64 so that bitsandbytes can quantize them")
        if self.crop % self.patch or any(side % self.crop for p in self.pinpoints for side in p):
            raise ValueError("the crop must be a multiple of the patch and every pinpoint a multiple of the crop")

    @property
    def pinpoint_lists(self) -> list[list[int]]:
        return [list(p) for p in self.pinpoints]

# A Mistral-layout chat template: system text leads the first user turn; an image part is
# followed by a newline when text follows it (unless that text starts with whitespace), matching
# the named `mistral` prompt format.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- if m['content'] is string -%}{%- set ns.system = m['content'] -%}"
    "{%- else -%}{%- set ns.system = m['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}{{ '[INST] ' }}"
    "{%- if ns.first and ns.system -%}{{ ns.system + '\\n\\n' }}{%- endif -%}"
    "{%- set ns.first = false -%}"
    "{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{ '<image>' }}"
    "{%- if not loop.last and m['content'][loop.index0 + 1]['type'] == 'text'"
    " and not (m['content'][loop.index0 + 1]['text'][:1]).isspace() -%}{{ '\\n' }}{%- endif -%}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{{ ' [/INST]' }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
)

_CORPUS = [
    "What is shown in this image? Describe the image. What shape is in the image?",
    "What color is the shape? What colour is the shape? Which shape do you see?",
    "A red circle. A green square. A blue triangle. A yellow circle on a light background.",
    "The image shows a small object near the centre, on the left, on the right, at the top.",
    "[INST] [/INST] USER: ASSISTANT: <|im_start|>system <|im_end|> Answer the questions.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "a photo of a cat, a dog, a car, a house, a tree, people, the sky, water and grass.",
    "There are two images. The first image and the second image differ in size and colour.",
    "0 1 2 3 4 5 6 7 8 9 yes no it is this that there the a an of in on with and or",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown characters) trained on a fixed corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=1024,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, arch: TinyArch = TinyArch()) -> LlavaNextProcessor:
    """The processor: anyres image processor with tiny crops, the tokenizer and the chat template."""
    image_processor = ImageProcessor(
        size={"shortest_edge": arch.crop},
        crop_size={"height": arch.crop, "width": arch.crop},
        image_grid_pinpoints=arch.pinpoint_lists,
        do_convert_rgb=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=arch.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, arch: TinyArch = TinyArch()) -> LlavaNextConfig:
    """Architecture of the tiny model: CLIP vision tower, projector, Mistral language model."""
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_width, intermediate_size=2 * arch.vision_width,
        num_hidden_layers=arch.vision_layers, num_attention_heads=4, image_size=arch.crop,
        patch_size=arch.patch, projection_dim=arch.vision_width,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_width, intermediate_size=2 * arch.text_width,
        num_hidden_layers=arch.text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, sliding_window=None, initializer_range=arch.initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=arch.pinpoint_lists,
        vision_feature_select_strategy="default",
        vision_feature_layer=arch.vision_feature_layer,
        tie_word_embeddings=False,
    )


def build_untrained(
    arch: TinyArch = TinyArch(), seed: int = 0
) -> tuple[LlavaNextProcessor, LlavaNextForConditionalGeneration]:
    """Processor and freshly initialised model; the same arch and seed give the same weights."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, arch)
    config = build_config(tokenizer, arch)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return processor, model


def make_tiny_model(out_dir: str | os.PathLike, seed: int = 0, arch: TinyArch = TinyArch()) -> Path:
    """Build and save the checkpoint; the same seed always writes the same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor, model = build_untrained(arch, seed)
    processor.save_pretrained(out)
    model.save_pretrained(out)
    log.info("wrote a %d-parameter checkpoint to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = make_tiny_model(args.out_dir, args.seed)
    print(f"tiny LLaVA-NeXT checkpoint written to {out}")


if __name__ == "__main__":
    main()
