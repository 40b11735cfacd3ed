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

    class PoisonedServer(LlavaNextServer):
        def __init__(self, options):
            super().__init__(options)
            fail_steps(self.engine, carrying(token_ids))

    return PoisonedServer


def hang_steps_once(engine, token_ids: list[int], marker: str) -> None:
    """Make the first step that carries `token_ids` in any process hang for good (a stuck kernel);
    the process that hangs creates `marker`, so a replacement replica steps normally."""
    import os
    import threading

    def should_fail(ids: torch.Tensor) -> Exception | None:
        if carrying(token_ids)(ids) is not None and not os.path.exists(marker):
            open(marker, "w").close()
            threading.Event().wait()
        return None

    fail_steps(engine, should_fail)


def hanging_server(token_ids: list[int], marker: str):
    """The endpoint's replica class whose engine loop hangs on the first step carrying `token_ids`."""
    from actors.serve_app import LlavaNextServer

    class HangingServer(LlavaNextServer):
        def __init__(self, options):
            super().__init__(options)
            hang_steps_once(self.engine, token_ids, marker)

    return HangingServer
