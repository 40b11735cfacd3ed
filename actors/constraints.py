"""Constrained answers: a JSON schema, one of a list of choices, a regex or a grammar, enforced
token by token by masking the logits of every token that cannot continue a valid answer.

The backend is llguidance (on PyPI: a 3 MB Rust wheel with no dependencies). Each request gets a
matcher that follows its tokens and computes, on the CPU, the bitmask of the tokens allowed next;
the mask is applied to the logits on whatever device they are, so the GPU path is the CPU path.
xgrammar, the other maintained backend (vLLM falls back from one to the other), pulls `triton`
(several hundred MB) into every Linux x86-64 install, and its CPU kernel is one path among two;
llguidance covers JSON Schema, regexes, choices and Lark grammars (GBNF converted), and computes
a mask in microseconds.

The mask is as wide as the model's lm_head (`text_config.vocab_size`), not the tokenizer's length:
rows past the tokenizer's vocabulary, and special tokens, are never allowed; end-of-sequence only
where the grammar may end. JSON is compact (no optional whitespace), so an answer is the data and
not layout. Compiled grammars are kept in a bounded cache keyed by the constraint's text, each
with a matcher at its start that a request's matcher is copied from (a copy takes microseconds,
building one from the grammar's text about a millisecond), and compiling runs under llguidance's
parser limits, so a hostile schema costs milliseconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import LLMatcher, LLParserLimits

from pipeline.config import Constraint

log = logging.getLogger(__name__)

CACHE_SIZE = 256
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
LIMITS = LLParserLimits()
NO_COMPILES = {"constraint_compiles": 0, "constraint_cache_hits": 0, "constraint_compile_s": 0.0}


class ConstraintError(ValueError):
    """A constraint that does not compile (the backend's reason in the message)."""


class Grammars:
    """The compiled grammars of one checkpoint, and a matcher for each request that needs one."""

    def __init__(self, tokenizer, vocab_rows: int, eos_ids: list[int]):
        self.vocab = vocab_rows
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_rows, eos_token=eos_ids)
        self._cache: OrderedDict[Constraint, tuple[str, LLMatcher]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.compiles = 0
        self.compile_s = 0.0

    def grammar(self, constraint: Constraint) -> str:
        """The compiled grammar of a constraint, from the cache when it has been seen (raises ConstraintError)."""
        return self._compiled(constraint)[0]

    def matcher(self, constraint: Constraint) -> LLMatcher:
        """A fresh matcher at the start of an answer under `constraint` (raises ConstraintError)."""
        start = self._compiled(constraint)[1]
        with self._lock:  # copies of one matcher are taken one at a time
            return start.deep_copy()

    def _compiled(self, constraint: Constraint) -> tuple[str, LLMatcher]:
        """The grammar's text and a matcher at its start, compiled once per constraint."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                self.hits += 1
                return self._cache[constraint]
        start = time.perf_counter()
        grammar = check(constraint, self.tokenizer)
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise ConstraintError(f"the {constraint.kind.replace('_', ' ')} does not compile: {matcher.get_error()}")
        with self._lock:
            self.compiles += 1
            self.compile_s += time.perf_counter() - start
            self._cache[constraint] = (grammar, matcher)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar, matcher

    def stats(self) -> dict[str, float]:
        return {"constraint_compiles": self.compiles, "constraint_cache_hits": self.hits,
                "constraint_compile_s": round(self.compile_s, 4)}


def check(constraint: Constraint, tokenizer: llguidance.LLTokenizer | None = None) -> str:
    """The constraint's grammar, checked (raises ConstraintError with the backend's reason).

    Without a tokenizer it checks what does not depend on one, so a job can refuse a bad schema,
    regex or grammar at start-up without loading the model."""
    grammar = _source(constraint)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=LIMITS)
    if failed:
        raise ConstraintError(f"the {constraint.kind.replace('_', ' ')} does not compile: {messages[0].strip()}")
    return grammar


def _source(constraint: Constraint) -> str:
    """llguidance's grammar text for a constraint."""
    if constraint.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(constraint.text, overrides=COMPACT_JSON)
    if constraint.kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in constraint.options))
    if constraint.kind == "regex":
        return LLMatcher.grammar_from_regex(constraint.text)
    try:
        return llguidance.grammar_from("grammar", constraint.text)  # Lark as it is, GBNF converted
    except ValueError as exc:
        raise ConstraintError(f"the grammar does not compile: {exc}") from None


def allowed(matchers: list[LLMatcher], vocab: int, device: torch.device) -> torch.Tensor:
    """`(rows, vocab)` booleans: the tokens each matcher allows next.

    One call per row, in this thread: llguidance's `LLExecutor` computes a step's rows in one call
    on a thread pool, but its threads keep the core busy after the call, and a one-core worker's
    step then took 1.37x a free one instead of 1.22x (tiny checkpoint, 32 rows). The bits are
    unpacked by numpy on the CPU, five times faster than torch's shifts for 32 rows."""
    words = (vocab + 31) // 32
    bits = np.zeros((len(matchers), words), dtype=np.uint32)
    for row, matcher in enumerate(matchers):
        matcher.unsafe_compute_mask_ptr(bits[row].ctypes.data, words * 4)
    # Token 32w + j is bit j of word w: the words as little-endian bytes, each read from its lowest bit.
    ok = np.unpackbits(bits.astype("<u4", copy=False).view(np.uint8), axis=1, count=vocab, bitorder="little")
    return torch.from_numpy(ok.view(np.bool_)).to(device)


class GrammarProcessor:
    """A transformers logits processor for `generate`: row i of the batch follows `matchers[i]`.

    Each call first gives every matcher the token its row got at the last step, then masks. A row
    whose answer is complete may only end (its matcher then allows end-of-sequence alone).
    """

    def __init__(self, matchers: list[LLMatcher], pad_id: int):
        self.matchers = matchers
        self.pad_id = pad_id
        self._started = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._started:
            self.advance(input_ids[:, -1].tolist())
        self._started = True
        mask = allowed(self.matchers, scores.shape[-1], scores.device)
        stopped = torch.tensor([m.is_stopped() for m in self.matchers], device=scores.device)
        mask[stopped, self.pad_id] = True  # a finished row is padded by `generate`
        return scores.masked_fill(~mask, float("-inf"))

    def advance(self, tokens: list[int]) -> None:
        for matcher, token in zip(self.matchers, tokens):
            if not matcher.is_stopped():
                matcher.consume_token(token)
