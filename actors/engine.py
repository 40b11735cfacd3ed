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

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from actors.checkpoint import Checkpoint
from actors.continuous import ContinuousLoop
from actors.static import StaticScheduler
from pipeline.answers import constraint_option
from pipeline.config import ConfigError, EngineConfig, ImageLimits, SamplingParams
from pipeline.datasets import encoded
from pipeline.fetch import FetchError, fetch
from pipeline.preprocess import ImageError, prepare
from pipeline.prompts import PromptError
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

    @classmethod
    def from_pretrained(cls, path: str, **engine_options: Any) -> "Engine":
        """An engine on a saved checkpoint; options are `EngineConfig`'s (`max_new_tokens=`,
        `scheduler=`, `dtype=`, ...), checked the same way as the job's flags."""
        return cls(EngineConfig(model=str(path), **engine_options))

    def ask(self, images: Any, question: str, **sampling: Any) -> GenerationResult:
        """One question about one image or a list of them (PIL images, numpy arrays, bytes, paths or
        URIs), answered the way the job answers it: the CPU stage's exact tiling and the same
        prompt format. `sampling` is `max_new_tokens=`, `temperature=`, `top_p=`, `top_k=`,
        `seed=`, `stop=`, `logprobs=`, and at most one of `json_schema=`, `choices=`, `regex=`,
        `grammar=`. An image that cannot be read is an error in the result, as in the job."""
        return self.ask_many([(images, question)], **sampling)[0]

    def ask_many(self, items: list[tuple[Any, str]], **sampling: Any) -> list[GenerationResult]:
        """`ask` for a list of (images, question) pairs, answered together (one result each, in order)."""
        params = self._sampling(sampling)
        results: list[GenerationResult | None] = []
        requests, where = [], []
        for images, question in items:
            try:
                requests.append(self._request(images, question, params))
                where.append(len(results))
                results.append(None)
            except ValueError as exc:
                results.append(GenerationResult(error=str(exc)))
        for k, result in zip(where, self.generate(requests) if requests else []):
            results[k] = result
        return results

    def _sampling(self, options: dict[str, Any]) -> SamplingParams:
        """The engine's sampling defaults with the caller's options and constraint (raises ConfigError)."""
        constraint = constraint_option(options)
        rest = {k: v for k, v in options.items() if k not in ("json_schema", "choices", "regex", "grammar")}
        known = {f.name for f in dataclasses.fields(SamplingParams)} - {"constraint", "choice_probs"}
        if unknown := sorted(set(rest) - known):
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}, "
                              "json_schema, choices, regex, grammar")
        if isinstance(rest.get("stop"), str):
            rest["stop"] = (rest["stop"],)
        return dataclasses.replace(self.default_params(), **rest, constraint=constraint,
                                   choice_probs=constraint is not None and constraint.kind == "choice")

    def _request(self, images: Any, question: str, params: SamplingParams) -> GenerationRequest:
        """A request from images in any form the notebook has them (raises a stage-prefixed ValueError)."""
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        prepared = []
        for k, source in enumerate(sources):
            try:
                data = fetch(encoded(source), 10.0, ImageLimits().max_bytes)
            except FetchError as exc:
                raise ValueError(f"fetch: {exc}") from None
            try:
                prepared.append(prepare(data, self.spec))
            except ImageError as exc:
                where = f" (image {k + 1} of {len(sources)})" if len(sources) > 1 else ""
                raise ValueError(f"decode: {exc}{where}") from None
        try:
            prompt = self.format_question(question, len(prepared))
        except PromptError as exc:
            raise ValueError(f"prompt: {exc}") from None
        return GenerationRequest(prompt, [p.tiles for p in prepared], [p.size for p in prepared], params,
                                 [p.digest for p in prepared])

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

    def alive(self) -> bool:
        """Whether the scheduler can still answer: the continuous loop's thread runs (the static
        scheduler starts its thread on demand, so it always can)."""
        return self.loop is None or self.loop.alive()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()
        self.static.close()
