"""Prompt formats as data: the strings LLaVA-NeXT checkpoints were trained on, in one table.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": [parts]}`
where a part is `{"type": "text", "text": str}` or `{"type": "image"}`; that is also the shape
that transformers chat templates take, so a checkpoint's own template and our named formats
render the same input. Every image part becomes one `<image>` placeholder.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Callable

IMAGE_TOKEN = "<image>"
TEMPLATE = "template"  # resolved format meaning "the checkpoint's own chat template"

Message = dict
ApplyTemplate = Callable[[list[Message]], str]


class PromptError(ValueError):
    """A prompt that cannot be built for its row (reported as that row's error)."""


@dataclass(frozen=True)
class PromptFormat:
    """One checkpoint family's conversation layout.

    `system` wraps the system text (None: the family has no system turn, so the text is put in
    front of the first user turn); `user`/`assistant` wrap one turn; `generation` opens the reply.
    """

    default_system: str
    system: str | None
    user: str
    assistant: str
    generation: str


FORMATS: dict[str, PromptFormat] = {
    "mistral": PromptFormat(
        default_system="",
        system=None,
        user="[INST] {content} [/INST]",
        assistant=" {content} ",
        generation="",
    ),
    "vicuna": PromptFormat(
        default_system=(
            "A chat between a curious human and an artificial intelligence assistant. The assistant "
            "gives helpful, detailed, and polite answers to the human's questions."
        ),
        system="{content} ",
        user="USER: {content} ",
        assistant="ASSISTANT: {content}</s>",
        generation="ASSISTANT:",
    ),
    "34b": PromptFormat(
        default_system="Answer the questions.",
        system="<|im_start|>system\n{content}<|im_end|>",
        user="<|im_start|>user\n{content}<|im_end|>",
        assistant="<|im_start|>assistant\n{content}<|im_end|>",
        generation="<|im_start|>assistant\n",
    ),
}

# Language-model families and the named format their LLaVA-NeXT checkpoints use.
_FAMILY_FORMATS = {"mistral": "mistral", "llama": "vicuna"}


def resolve_format(
    requested: str, has_chat_template: bool, text_model_type: str | None, vocab_has_im_start: bool
) -> str:
    """Turn `auto` into a concrete format: the checkpoint's template, else its family's format.

    Yi-34B is a llama-architecture model, so it is told apart from vicuna by its ChatML tokens.
    """
    if requested != "auto":
        return requested
    if has_chat_template:
        return TEMPLATE
    if vocab_has_im_start:
        return "34b"
    if text_model_type in _FAMILY_FORMATS:
        return _FAMILY_FORMATS[text_model_type]
    raise ValueError(
        f"cannot tell the prompt format of a checkpoint without a chat template whose language model "
        f"is {text_model_type!r}; pass --prompt-format mistral|vicuna|34b|raw"
    )


def question_parts(question: str, num_images: int) -> list[dict]:
    """Split a question into text and image parts, checking placeholders against the images.

    A question without `<image>` gets one image part per image in front of the text; one with
    placeholders must have exactly as many as the row has images.
    """
    count = question.count(IMAGE_TOKEN)
    if count == 0:
        return [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    if count != num_images:
        raise PromptError(f"the prompt has {count} {IMAGE_TOKEN} placeholders but the row has {num_images} images")
    parts: list[dict] = []
    for i, chunk in enumerate(question.split(IMAGE_TOKEN)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _content_text(content: str | list[dict]) -> str:
    """Render one message's parts as text.

    An image directly followed by text takes a newline (the layout the checkpoints were trained
    on), unless the text already starts with whitespace, so inline placeholders read as written.
    """
    if isinstance(content, str):
        return content
    out: list[str] = []
    for i, part in enumerate(content):
        if part["type"] == "image":
            nxt = content[i + 1] if i + 1 < len(content) else None
            needs_newline = nxt is not None and nxt["type"] == "text" and not nxt["text"][:1].isspace()
            out.append(IMAGE_TOKEN + ("\n" if needs_newline else ""))
        else:
            out.append(part["text"])
    return "".join(out)


def render_named(messages: list[Message], fmt: PromptFormat) -> str:
    """Render a conversation with a named format, ending with the opening of the assistant's reply."""
    system = fmt.default_system
    turns = []
    for message in messages:
        if message["role"] == "system":
            system = _content_text(message["content"])
        else:
            turns.append(message)
    out: list[str] = []
    if fmt.system is not None and system:
        out.append(fmt.system.format(content=system))
    first_user = True
    for message in turns:
        text = _content_text(message["content"])
        if message["role"] == "user":
            if fmt.system is None and system and first_user:
                text = f"{system}\n\n{text}"
            first_user = False
            out.append(fmt.user.format(content=text))
        elif message["role"] == "assistant":
            out.append(fmt.assistant.format(content=text))
        else:
            raise PromptError(f"unknown message role {message['role']!r}")
    out.append(fmt.generation)
    return "".join(out)


def count_images(messages: list[Message]) -> int:
    """Number of image parts in a conversation."""
    return sum(
        1
        for m in messages
        if not isinstance(m["content"], str)
        for p in m["content"]
        if p["type"] == "image"
    )


def render(messages: list[Message], fmt_name: str, apply_template: ApplyTemplate | None = None) -> str:
    """Render a conversation with a resolved format name, the checkpoint template, or raw text.

    The result is checked to hold exactly one placeholder per image, whatever the format.
    """
    if fmt_name == TEMPLATE:
        if apply_template is None:
            raise ValueError("the checkpoint template was chosen but none was given")
        text = apply_template(messages)
    elif fmt_name == "raw":
        text = "".join(_content_text(m["content"]) for m in messages)
    elif fmt_name in FORMATS:
        text = render_named(messages, FORMATS[fmt_name])
    else:
        raise ValueError(f"unknown prompt format {fmt_name!r}")
    expected, found = count_images(messages), text.count(IMAGE_TOKEN)
    if expected != found:
        raise PromptError(f"the prompt has {found} {IMAGE_TOKEN} placeholders but the row has {expected} images")
    return text


def format_question(
    question: str, num_images: int, fmt_name: str, apply_template: ApplyTemplate | None = None
) -> str:
    """The prompt for one batch row: a single user turn holding the row's images and question."""
    messages = [{"role": "user", "content": question_parts(question, num_images)}]
    return render(messages, fmt_name, apply_template)


def mark_literals(messages: list[Message], literals: tuple[str, ...]) -> tuple[list[Message], dict[str, str]]:
    """Copies of `messages` whose text has each occurrence of a `literals` string (a tokenizer's
    special tokens, the image placeholder) replaced by a marker no client can type, and the map
    from markers back to the strings. The format then cannot mistake client text for its own."""
    if not literals:
        return messages, {}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(set(literals), key=len, reverse=True)))
    nonce = secrets.token_hex(6)
    markers: dict[str, str] = {}

    def mark(match: re.Match) -> str:
        marker = f"\ue000{nonce}:{len(markers)}\ue001"
        markers[marker] = match.group(0)
        return marker

    def text(value: str) -> str:
        return pattern.sub(mark, value)

    marked = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = text(content)
        else:
            content = [{**p, "text": text(p["text"])} if p["type"] == "text" else p for p in content]
        marked.append({**message, "content": content})
    return marked, markers


def restore_literals(text: str, markers: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered prompt with the marked strings put back, and the (start, end) of each in it."""
    if not markers:
        return text, []
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length, pos = 0, 0
    for match in re.finditer("|".join(re.escape(m) for m in markers), text):
        before = text[pos:match.start()]
        original = markers[match.group(0)]
        pieces += [before, original]
        spans.append((length + len(before), length + len(before) + len(original)))
        length += len(before) + len(original)
        pos = match.end()
    pieces.append(text[pos:])
    return "".join(pieces), spans


@dataclass(frozen=True)
class Formatter:
    """A checkpoint's resolved prompt format, shared by the CPU stage, the engine and Serve."""

    fmt: str
    apply_template: ApplyTemplate | None = None

    @classmethod
    def from_processor(cls, processor, text_model_type: str | None, requested: str = "auto") -> "Formatter":
        """Resolve `requested` against a loaded transformers processor and its language model type."""
        template = getattr(processor, "chat_template", None)
        fmt = resolve_format(
            requested,
            has_chat_template=bool(template),
            text_model_type=text_model_type,
            vocab_has_im_start="<|im_start|>" in processor.tokenizer.get_vocab(),
        )

        def apply(messages: list[Message]) -> str:
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        return cls(fmt, apply if fmt == TEMPLATE else None)

    def question(self, question: str, num_images: int) -> str:
        """Format one question about `num_images` images (raises PromptError)."""
        return format_question(question, num_images, self.fmt, self.apply_template)

    def conversation(self, messages: list[Message]) -> str:
        """Format a whole conversation (raises PromptError)."""
        return render(messages, self.fmt, self.apply_template)

    def conversation_literal(self, messages: list[Message], literals: tuple[str, ...]
                             ) -> tuple[str, list[tuple[int, int]]]:
        """Format a conversation in which the `literals` strings typed in its text are plain text:
        the prompt, and the spans of those strings in it (for the tokenizer to treat as text)."""
        marked, markers = mark_literals(messages, literals)
        return restore_literals(render(marked, self.fmt, self.apply_template), markers)
