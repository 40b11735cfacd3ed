"""Image features as tokens: a bounded table of encoded images and the embedding that reads it.

The continuous-batching loop takes token ids only. Each encoded image (the projector's output,
newline tokens included: exactly as many rows as the image has placeholder tokens) is stored in
rows of one preallocated table, and the image's placeholder run in a prompt is replaced by ids
past the vocabulary that name those rows. `FeatureEmbedding` replaces the language model's input
embedding: ids inside the vocabulary are looked up as before, ids past it in the table. The
lookup is branch-free and the table never moves, so it also runs inside captured CUDA graphs.

An id is `vocab + epoch * capacity + row`, where a row's epoch grows each time the row is given
to another image. Identical images therefore get identical ids (so the KV of a shared prefix can
be reused), and a reused row never repeats an id that cached KV blocks may still carry. When a
row's epoch would no longer fit in int32 ids, the table asks for a restart: the owner lets the
requests in flight finish, drops the KV blocks cached for reuse, and calls `restart`, which
forgets every cached image and sets every epoch back to 0.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

INT32_MAX = 2**31 - 1


class FeatureEmbedding(nn.Module):
    """The language model's embedding, extended with rows of image features for ids past `vocab`."""

    def __init__(self, base: nn.Module, table: torch.Tensor, vocab: int):
        super().__init__()
        self.base = base
        self.register_buffer("table", table, persistent=False)
        self.vocab = vocab
        self.capacity = table.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_image = input_ids >= self.vocab
        text = self.base(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        rows = torch.remainder(torch.where(is_image, input_ids - self.vocab, torch.zeros_like(input_ids)), self.capacity)
        image = self.table[rows.long()].to(text.dtype)
        return torch.where(is_image.unsqueeze(-1), image, text)


@dataclass
class Entry:
    """One encoded image in the table: its rows, the ids naming them, and who uses it.

    `ready` is set once the features are written (or the encoding failed, with `error` set).
    """

    digest: str
    rows: np.ndarray
    ids: list[int]
    refs: int = 0
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class FeatureTable:
    """Encoded images, keyed by digest, in a fixed number of rows; unused ones leave in LRU order.

    Thread-safe: submissions acquire and release entries while the step loop reads the rows.
    """

    def __init__(self, capacity: int, width: int, vocab: int, dtype: torch.dtype, device: torch.device):
        if capacity < 1:
            raise ValueError("the image feature table needs at least one row")
        self.capacity = capacity
        self.vocab = vocab
        self.tensor = torch.zeros((capacity, width), dtype=dtype, device=device)
        self.max_epoch = (INT32_MAX - vocab) // capacity - 1
        if self.max_epoch < 1:
            raise ValueError(f"an image cache of {capacity} rows leaves no room for ids past the vocabulary")
        self._epochs = np.zeros(capacity, dtype=np.int64)
        self._free = np.ones(capacity, dtype=bool)
        self._entries: dict[str, Entry] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # unreferenced entries, least recently used first
        self._lock = threading.Lock()
        self.restart_pending = False
        self.encodings_requested = 0
        self.encodings_run = 0
        self.evictions = 0
        self.restarts = 0

    @property
    def referenced(self) -> int:
        """Entries some live request still uses."""
        with self._lock:
            return len(self._entries) - len(self._idle)

    def acquire(self, digest: str, num_tokens: int) -> tuple[Entry, bool] | None:
        """Reference the entry for `digest`: `(entry, True)` when it is new and the caller must
        encode the image and `publish` it, `(entry, False)` when it exists (wait for `ready`).

        Returns None when rows cannot be had now (all in use, or a restart is pending): retry
        after releases. Raises ValueError when the image could never fit.
        """
        if num_tokens > self.capacity:
            raise ValueError(
                f"an image of {num_tokens} tokens does not fit the image cache of {self.capacity} rows "
                "(raise --image-cache-mb)"
            )
        with self._lock:
            if self.restart_pending:
                return None
            entry = self._entries.get(digest)
            if entry is not None:
                self.encodings_requested += 1
                entry.refs += 1
                self._idle.pop(digest, None)
                return entry, False
            while np.count_nonzero(self._free) < num_tokens and self._idle:
                self._evict(self._entries[next(iter(self._idle))])
            if np.count_nonzero(self._free) < num_tokens:
                return None
            rows = np.flatnonzero(self._free)[:num_tokens]
            if self._epochs[rows].max() + 1 > self.max_epoch:
                self.restart_pending = True
                return None
            self.encodings_requested += 1
            self.encodings_run += 1
            self._free[rows] = False
            self._epochs[rows] += 1
            ids = (self.vocab + self._epochs[rows] * self.capacity + rows).tolist()
            entry = Entry(digest, rows, ids, refs=1)
            self._entries[digest] = entry
            return entry, True

    def publish(self, entry: Entry, features: torch.Tensor) -> None:
        """Write an entry's encoded features into its rows and wake whoever waits for them."""
        index = torch.from_numpy(entry.rows).to(self.tensor.device)
        self.tensor.index_copy_(0, index, features.to(self.tensor.dtype))
        if self.tensor.device.type == "cuda":
            torch.cuda.current_stream(self.tensor.device).synchronize()
        entry.ready.set()

    def fail(self, entry: Entry, error: str) -> None:
        """The encoding failed: waiters see `error`, and later requests for the image try afresh."""
        with self._lock:
            entry.error = error
            if self._entries.get(entry.digest) is entry:
                del self._entries[entry.digest]
        entry.ready.set()

    def release(self, entry: Entry) -> None:
        """Drop one reference; an unreferenced good entry stays cached until its rows are needed."""
        with self._lock:
            entry.refs -= 1
            if entry.refs > 0:
                return
            if entry.error is not None or not entry.ready.is_set():
                self._evict(entry)
            else:
                self._idle[entry.digest] = None

    def restart(self) -> None:
        """Forget every cached image and set every epoch to 0 (nothing may be referenced)."""
        with self._lock:
            if len(self._entries) != len(self._idle):
                raise RuntimeError("the image table can only restart when no request uses it")
            for digest in list(self._idle):
                self._evict(self._entries[digest])
            self._epochs[:] = 0
            self.restart_pending = False
            self.restarts += 1

    def _evict(self, entry: Entry) -> None:
        if self._entries.get(entry.digest) is entry:
            del self._entries[entry.digest]
        self._idle.pop(entry.digest, None)
        self._free[entry.rows] = True
        self.evictions += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "image_encodings_requested": self.encodings_requested,
                "image_encodings_run": self.encodings_run,
                "image_cache_entries": len(self._entries),
                "image_cache_rows_used": int(self.capacity - np.count_nonzero(self._free)),
                "image_cache_rows": self.capacity,
                "image_cache_evictions": self.evictions,
                "image_cache_restarts": self.restarts,
            }
