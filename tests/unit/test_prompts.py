"""Prompt formats: the exact strings the checkpoints were trained on, and placeholder rules."""

import pytest

from pipeline import prompts
from pipeline.prompts import PromptError

Q = "What is shown in this image?"


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("mistral", "[INST] <image>\nWhat is shown in this image? [/INST]"),
        (
            "vicuna",
            "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown "
            "in this image? ASSISTANT:",
        ),
        (
            "34b",
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in "
            "this image?<|im_end|><|im_start|>assistant\n",
        ),
        ("raw", "<image>\nWhat is shown in this image?"),
    ],
)
def test_named_formats_are_byte_exact(fmt, expected):
    assert prompts.format_question(Q, 1, fmt) == expected
    assert prompts.format_question("<image>\n" + Q, 1, fmt) == expected


def test_raw_multi_turn_is_kept_verbatim():
    text = "[INST] <image>\nQ1 [/INST] A1 [INST] <image>\nQ2 [/INST]"
    assert prompts.format_question(text, 2, "raw") == text


def test_question_without_placeholder_gets_one_per_image_before_text():
    assert prompts.format_question(Q, 2, "mistral") == "[INST] <image><image>\nWhat is shown in this image? [/INST]"
    assert prompts.format_question(Q, 0, "mistral") == "[INST] What is shown in this image? [/INST]"


@pytest.mark.parametrize("question, images", [("<image> <image> compare", 1), ("<image> what", 2), ("<image>", 3)])
def test_placeholder_count_must_match_images(question, images):
    with pytest.raises(PromptError, match="placeholders"):
        prompts.format_question(question, images, "mistral")


def test_multi_turn_named_formats():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert prompts.render(messages, "mistral") == "[INST] Be brief.\n\n<image>\nQ1 [/INST] A1 [INST] Q2 [/INST]"
    assert prompts.render(messages, "vicuna") == "Be brief. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert prompts.render(messages, "34b") == (
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
        "<|im_start|>assistant\nA1<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    )


def test_template_output_is_checked_against_images():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    assert prompts.render(messages, prompts.TEMPLATE, lambda m: "<image>Q") == "<image>Q"
    with pytest.raises(PromptError):
        prompts.render(messages, prompts.TEMPLATE, lambda m: "Q")


@pytest.mark.parametrize(
    "has_template, model_type, im_start, expected",
    [
        (True, "mistral", False, prompts.TEMPLATE),
        (False, "mistral", False, "mistral"),
        (False, "llama", False, "vicuna"),
        (False, "llama", True, "34b"),
    ],
)
def test_auto_resolution(has_template, model_type, im_start, expected):
    assert prompts.resolve_format("auto", has_template, model_type, im_start) == expected
    assert prompts.resolve_format("vicuna", has_template, model_type, im_start) == "vicuna"


def test_auto_without_template_or_known_family_asks_for_a_format():
    with pytest.raises(ValueError, match="--prompt-format"):
        prompts.resolve_format("auto", False, "qwen2", False)
