"""Faults the tests inject where no real one can be made on demand (there is no GPU to run out of,
and no kernel that breaks on one request's tokens)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def fail_steps(engine, should_fail: Callable[[torch.Tensor], Exception | None]) -> Callable[[], None]:
    """Make every model step of `engine` raise `should_fail(input_ids)` when that is not None.

    Returns the function that puts the real step back.
    """
    embedding = engine.model.get_input_embeddings()
    real = embedding.forward

    def forward(input_ids):
        error = should_fail(input_ids)
        if error is not None:
            raise error
        return real(input_ids)

    embedding.forward = forward
    return lambda: setattr(embedding, "forward", real)


def carrying(token_ids: list[int]) -> Callable[[torch.Tensor], Exception | None]:
    """A step fails when it carries any of `token_ids`, as a kernel that breaks on one request would."""
    marker = torch.tensor(sorted(token_ids))
    return lambda ids: RuntimeError("poisoned step") if torch.isin(ids, marker.to(ids.device)).any() else None


def poisoned_server(token_ids: list[int]):
    """The endpoint's replica class, its engine failing every step that carries `token_ids`."""
    from actors.serve_app import LlavaNextServer

    class PoisonedServer(LlavaNextServer.func_or_class):
        async def __init__(self, options):  # an ingress class's constructor is a coroutine
            await super().__init__(options)
            fail_steps(self.engine, carrying(token_ids))

    return PoisonedServer
