"""Which requests the next model step runs: a synchronous state machine with one owner, no model.

The continuous loop (actors/continuous.py) owns one `Scheduler`; it calls `schedule()` for a
`Plan`, runs the model on it (actors/runner.py), and hands the sampled tokens back to `update()`.
Nothing here touches a tensor, so every decision can be tested with hand-made requests and fake
outputs (tests/unit/test_scheduler.py).

Glossary
- request: one prompt (token ids, each image a run of placeholder ids) with its answer limit. It
  moves WAITING -> PREFILLING -> DECODING -> FINISHED; FINISHED says why (`finish_reason`:
  `stop`, `length`, `cancelled`, or an `error`).
- slot: one row of the KV cache, long enough for a prompt and its answer. A running request owns
  one, and running requests always hold slots 0..n-1 in order (`running[i].slot == i`): when one
  ends, the last moves into its slot (a `Move`), so a decode step reads one contiguous block.
- step: one model pass over one token of every decoding request and, in the `batch_tokens` left,
  chunks of the prompts being prefilled. There is no prefill phase nor decode phase: a long prompt
  is computed a chunk per step while the answers being streamed go on growing.
- prefix: a prompt up to the end of its last image, named by its text ids and image digests.
  Equal prefixes have equal KV, so it is computed once: the first request with a new prefix (the
  leader) prefills it and the runner stores a copy; a request with the same prefix that arrives
  while the leader computes (a follower) waits, then copies the stored prefix into its slot and
  prefills only the rest. Stored prefixes are kept most-recently-used first, within
  `prefix_tokens`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

PrefixKey = tuple


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(frozen=True)
class Image:
    """One image's run of placeholder ids in a prompt, and the digest naming its features."""

    start: int
    length: int
    digest: str


@dataclass(eq=False)
class Request:
    """One request's scheduling state. `payload` is the loop's own (sampling, listener, result)."""

    key: str
    prompt: list[int]
    max_new_tokens: int
    images: tuple[Image, ...] = ()
    payload: Any = None
    status: Status = Status.WAITING
    slot: int | None = None
    computed: int = 0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prefix: PrefixKey | None = field(init=False)

    def __post_init__(self) -> None:
        # The prompt's content up to the end of its last image (None without images).
        key: list = []
        at = 0
        for image in self.images:
            key += self.prompt[at:image.start]
            key.append(("image", image.digest, image.length))
            at = image.start + image.length
        self.prefix = tuple(key) if self.images else None

    @property
    def prefix_len(self) -> int:
        return max((i.start + i.length for i in self.images), default=0)

    @property
    def needs(self) -> int:
        """KV positions the request may fill: its prompt and its whole answer."""
        return len(self.prompt) + self.max_new_tokens

    @property
    def filled(self) -> int:
        """KV positions of its slot that hold something (its last token is not fed back yet)."""
        return self.computed + max(0, len(self.tokens) - 1)


@dataclass(frozen=True)
class Chunk:
    """Part of a prompt for a prefill step: positions [start, end) of `request`'s prompt.

    `copy_prefix` names a stored prefix to copy into the slot first (`start` is then its end);
    `store_prefix` asks the runner to keep a copy of the slot's prefix once this chunk is done;
    `last` means the chunk ends the prompt, so its final position gives the first answer token.
    """

    request: Request
    start: int
    end: int
    copy_prefix: PrefixKey | None = None
    store_prefix: PrefixKey | None = None
    last: bool = False


@dataclass(frozen=True)
class Move:
    """Copy `request`'s KV from slot `src` into slot `dst` (compaction). How much to copy is read
    when the move is applied, so KV the same step wrote after the move was planned goes along."""

    request: Request
    src: int
    dst: int

    @property
    def length(self) -> int:
        return self.request.filled


@dataclass
class Plan:
    """One step: KV moves and prefix evictions to apply first, then decode rows and prompt chunks.

    The decode rows read the `view` of slots 0..n-1 in one piece; requests in it that are still
    prefilling are carried along and their output is thrown away."""

    moves: list[Move] = field(default_factory=list)
    evict: list[PrefixKey] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    view: list[Request] = field(default_factory=list)  # decode: slots 0..n-1 up to the last decoding one

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.decode)

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.chunks] + list(self.decode)


@dataclass
class Counters:
    """Work asked of the loop and work it did, for `_summary.json` and `/v1/stats`."""

    requests: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    prefill_tokens_submitted: int = 0
    prefill_tokens_computed: int = 0
    prefill_tokens_matched: int = 0
    generated_tokens: int = 0
    peak_running: int = 0
    steps: int = 0
    isolated_steps: int = 0


class Scheduler:
    """Admission, prefix sharing, chunking, slot compaction and endings (see the module docstring)."""

    def __init__(self, slots: int, slot_tokens: int, batch_tokens: int, prefix_tokens: int,
                 eos_ids: frozenset[int], min_chunk: int = 16):
        self.slots = slots
        self.min_chunk = min_chunk
        self.slot_tokens = slot_tokens
        self.batch_tokens = batch_tokens
        self.prefix_tokens = prefix_tokens
        self.eos_ids = eos_ids
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stored: OrderedDict[PrefixKey, int] = OrderedDict()  # prefix -> length, most recent last
        self.computing: dict[PrefixKey, Request] = {}  # prefix -> its leader
        self.counters = Counters()
        self._moves: list[Move] = []
        self._evict: list[PrefixKey] = []

    # ---- requests in --------------------------------------------------------------------------

    def add(self, request: Request) -> bool:
        """Queue a request; False (and the request FINISHED with an error) when no slot can hold it."""
        self.counters.requests += 1
        self.counters.prefill_tokens_submitted += len(request.prompt)
        if request.needs > self.slot_tokens:
            self._end(request, error=(
                f"generate: the request needs {request.needs} tokens of KV cache but a slot holds {self.slot_tokens} "
                "(raise --kv-cache-mb, lower --max-running-requests or ask for fewer new tokens)"))
            return False
        self.waiting.append(request)
        return True

    def cancel(self, request: Request) -> bool:
        """End a request wherever it is; False when it had already ended."""
        if request.status is Status.FINISHED:
            return False
        self.counters.cancelled += 1
        self._end(request, reason="cancelled")
        return True

    def finish(self, request: Request, reason: str = "stop") -> None:
        """End a running request early (a stop string, a complete grammar)."""
        if request.status is not Status.FINISHED:
            self.counters.finished += 1
            self._end(request, reason=reason)

    def fail(self, request: Request, error: str) -> None:
        if request.status is not Status.FINISHED:
            self._end(request, error=error)

    # ---- the next step ------------------------------------------------------------------------

    def pending(self) -> tuple[list[Move], list[PrefixKey]]:
        """The slot moves and prefix evictions decided since the last plan, handed over now and not
        again: work between two steps that reads a request's slot (scoring choices) applies them
        first, since an ending in this step may already have moved the request's slot number."""
        moves, evict = self._moves, self._evict
        self._moves, self._evict = [], []
        return moves, evict

    def schedule(self) -> Plan:
        """The next step: admit what fits, a token for every decoding request, prompt chunks in the
        budget left (a page at least, so prefills always move)."""
        self._admit()
        prefilling = [r for r in self.running if r.status is Status.PREFILLING]
        decoding = [r for r in self.running if r.status is Status.DECODING]
        moves, evict = self.pending()
        plan = Plan(moves=moves, evict=evict)
        if decoding:
            plan.decode = decoding
            plan.view = self.running[: max(r.slot for r in decoding) + 1]
        if prefilling:
            plan.chunks = self._chunks(prefilling, max(self.min_chunk, self.batch_tokens - len(decoding)))
        if not plan.empty:
            self.counters.steps += 1
        return plan

    def _admit(self) -> None:
        """Give free slots to waiting requests in arrival order; a follower of a prefix being
        computed waits for it, without holding back the requests behind it."""
        kept: deque[Request] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            if request.status is Status.FINISHED:
                continue
            prefix = request.prefix
            if len(self.running) >= self.slots or (prefix is not None and prefix in self.computing):
                kept.append(request)
                continue
            request.status, request.slot = Status.PREFILLING, len(self.running)
            self.running.append(request)
            self.counters.peak_running = max(self.counters.peak_running, len(self.running))
            if prefix is not None and prefix not in self.stored:
                self.computing[prefix] = request
        self.waiting = kept

    def _chunks(self, prefilling: list[Request], budget: int) -> list[Chunk]:
        """Prompt chunks within `budget` tokens. A prompt that would fit a step of its own whole is
        not cut to fill the end of this one (its first chunk then runs as plain causal attention);
        one longer than a step is cut, and the first prompt always gets a chunk, so all move."""
        chunks: list[Chunk] = []
        for request in prefilling:
            if budget <= 0:
                break
            prefix, copy = request.prefix, None
            start = request.computed
            if start == 0 and prefix is not None and prefix in self.stored:
                # At least the prompt's last position is computed: its logits give the first token.
                copy, start = prefix, min(self.stored[prefix], len(request.prompt) - 1)
            left = len(request.prompt) - start
            if chunks and budget < left <= self.batch_tokens:
                continue
            if copy is not None:
                self.stored.move_to_end(prefix)
            end = min(len(request.prompt), start + budget)
            if end == start and copy is None:
                continue
            store = prefix if prefix is not None and self.computing.get(prefix) is request and \
                end >= request.prefix_len else None
            chunks.append(Chunk(request, start, end, copy, store, end == len(request.prompt)))
            budget -= end - start
        return chunks

    # ---- what the step made -------------------------------------------------------------------

    def update(self, plan: Plan, tokens: dict[str, int]) -> list[Request]:
        """Take a step's sampled tokens (by request key) and return the requests that changed:
        those that got a token, and those that ended."""
        changed: list[Request] = []
        for chunk in plan.chunks:
            request = chunk.request
            if request.status is not Status.PREFILLING:
                continue  # ended during the step (a cancel, a failure)
            if chunk.copy_prefix is not None:
                self.counters.prefill_tokens_matched += chunk.start
            self.counters.prefill_tokens_computed += chunk.end - chunk.start
            request.computed = chunk.end
            if chunk.store_prefix is not None:
                self._store(chunk.store_prefix, request.prefix_len)
            if chunk.last:
                request.status = Status.DECODING
                self._take(request, tokens[request.key])
                changed.append(request)
        for request in plan.decode:
            if request.status is Status.DECODING:
                self._take(request, tokens[request.key])
                changed.append(request)
        return changed

    def _take(self, request: Request, token: int) -> None:
        request.tokens.append(token)
        self.counters.generated_tokens += 1
        if token in self.eos_ids:
            self.finish(request, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self.finish(request, "length")

    def _store(self, prefix: PrefixKey, length: int) -> None:
        self.computing.pop(prefix, None)
        if length > self.prefix_tokens:
            return
        self.stored[prefix] = length
        self.stored.move_to_end(prefix)
        while sum(self.stored.values()) > self.prefix_tokens:
            old, _ = self.stored.popitem(last=False)
            self._evict.append(old)

    # ---- endings ------------------------------------------------------------------------------

    def _end(self, request: Request, reason: str | None = None, error: str | None = None) -> None:
        """FINISHED: out of the waiting queue or its slot (the last running request moves into it),
        and no longer the leader of a prefix (its followers may start)."""
        if error is not None:
            self.counters.failed += 1
        request.status, request.finish_reason, request.error = Status.FINISHED, reason, error
        prefix = request.prefix
        if prefix is not None and self.computing.get(prefix) is request:
            del self.computing[prefix]
        if request.slot is None:
            return
        slot, last = request.slot, self.running[-1]
        request.slot = None
        self.running.pop()
        if last is not request:
            self._moves.append(Move(last, last.slot, slot))
            last.slot = slot
            self.running[slot] = last

    # ---- reports ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        out = dict(self.counters.__dict__)
        waiting = [r for r in self.waiting if r.status is Status.WAITING]
        out.update(
            running=len(self.running), waiting=len(waiting),
            waiting_on_prefill=sum(1 for r in waiting if r.prefix is not None and r.prefix in self.computing),
            prefixes_stored=len(self.stored), prefix_tokens_stored=sum(self.stored.values()),
        )
        # The slots' KV positions in use and in all (stored prefixes apart), for the replica's gauges.
        out.update(kv_tokens_used=sum(r.filled for r in self.running), kv_tokens_total=self.slots * self.slot_tokens)
        return out
