"""Answer text as tokens arrive: stop strings found, and only text that can no longer change released.

Decoding a growing token list can change its tail: a multi-byte character split across tokens
decodes to U+FFFD until its last byte arrives, and text that may be the start of a stop string
must not reach a client until the next tokens show it is not. `TextTracker` holds both back, so
the text it releases only ever grows and, once the answer is done, equals the final answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextTracker:
    """Follows one answer's tokens; tells when a stop string ends it and what text is final."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self.stops = tuple(s for s in stops if s)
        self.tokens: list[int] = []
        self._text: str | None = ""
        self.stopped = False

    def update(self, tokens: Sequence[int]) -> bool:
        """Take the answer's tokens so far; True when a stop string has now ended it.

        On a stop, `tokens` keeps only the tokens up to the one that completed the stop string
        and `text` is cut just before it.
        """
        if self.stopped:
            return True
        start = min(len(self.tokens), len(tokens))  # a re-run starts its tokens over
        self.tokens = list(tokens)
        if not self.stops:
            self._text = None  # decoded when asked for
            return False
        # Check each new token's prefix, so the answer is cut at the first token that completes a stop.
        for end in range(max(start, 1), len(self.tokens) + 1):
            text = self._decode(self.tokens[:end])
            cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.tokens, self._text, self.stopped = self.tokens[:end], text[:cut], True
                return True
            self._text = text
        return False

    @property
    def text(self) -> str:
        """The answer so far (cut before the stop string once one ended it)."""
        if self._text is None:
            self._text = self._decode(self.tokens)
        return self._text

    def stable(self, finished: bool = False) -> str:
        """The text that later tokens cannot change (all of it once the answer is finished)."""
        if finished or self.stopped:
            return self.text
        text = self.text.rstrip(REPLACEMENT)
        # Hold back the longest tail that could still grow into a stop string.
        for keep in range(min(len(text), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(text[-keep:]) for s in self.stops):
                return text[:-keep]
        return text
