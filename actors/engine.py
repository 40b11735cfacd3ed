"""The generation engine: a loaded checkpoint with a scheduler, the one class batch and online use.

It is plain Python with no Ray in it; the Ray Data predictor and the Serve replica both wrap it,
so batch and online answers can never disagree. Both drive it the same way whatever the
scheduler: `generate` for a list of requests, or `submit` / `cancel` one at a time, with an
optional listener told as each token arrives (continuous scheduler only).

- `continuous` (the default): a loop steps every running request together, token by token, and
  requests join and leave at any step (actors/continuous.py);
- `static`: whole left-padded batches through transformers' `generate` (actors/static.py), the
  reference path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from actors.checkpoint import Checkpoint
from actors.continuous import ContinuousLoop
from actors.static import StaticScheduler
from pipeline.config import EngineConfig
from pipeline.schemas import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class Engine(Checkpoint):
    """A checkpoint and its scheduler; `generate`, `submit`, `cancel`, `stats`, `close`.

    `max_batch_size` and `batch_wait_ms` shape the static scheduler's batches of submitted
    requests (a server's concurrent requests); `generate` takes its list as one batch.
    """

    def __init__(self, cfg: EngineConfig, max_batch_size: int = 8, batch_wait_ms: float = 20.0):
        super().__init__(cfg)
        self.static = StaticScheduler(self, max_batch_size, batch_wait_ms)
        self.loop = ContinuousLoop(self, cfg) if cfg.scheduler == "continuous" else None
        self.scheduler = cfg.scheduler
        log.info(
            "engine ready: %s on %s (%s, attention %s, quantization %s, prompt format %s, %s scheduler)",
            cfg.model, self.device, self.dtype, cfg.attn_implementation, cfg.quantization, self.formatter.fmt,
            self.scheduler,
        )

    @property
    def streams(self) -> bool:
        """Whether submitted requests report their tokens as they are made."""
        return self.loop is not None

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer a list of requests; each gets exactly one result, failures as row errors."""
        if self.loop is None:
            return self.static.generate(requests)
        submissions = [self.loop.submit(r) for r in requests]
        return [s.future.result() for s in submissions]

    def generate_static(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """The reference: static batches of `generate`, whichever scheduler the engine runs."""
        return self.static.generate(requests)

    def submit(self, request: GenerationRequest, on_update: Callable | None = None):
        """Hand one request to the scheduler; the returned handle's `future` resolves to its result."""
        return (self.loop or self.static).submit(request, on_update)

    def cancel(self, submission) -> None:
        """Stop a submitted request (a no-op once it is done)."""
        (self.loop or self.static).cancel(submission)

    def kv_capacity_tokens(self) -> int | None:
        """Tokens one request may hold in the continuous loop's KV cache (None under the static scheduler)."""
        return self.loop.capacity_tokens if self.loop is not None else None

    def stats(self) -> dict[str, int]:
        """The scheduler's counters."""
        return self.loop.stats() if self.loop is not None else self.static.stats()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
        self.static.close()
