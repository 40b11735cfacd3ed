"""Image-aware routing: requests that carry the same image go to the replica that already holds it.

A replica's engine keeps each image's encoded features and the KV of its prompt prefix, so a
conversation about one image, which resends the image every turn, is cheapest on the replica
that saw it first. Serve's default router picks the shorter queue of two random replicas, and
Ray Serve LLM's prefix router matches prompt text, which cannot tell two images apart; here the
ingress computes an image key per request (a digest of the first image's URL, data URLs
included, so the same bytes or the same address give the same key) and this router sends the
request to that key's home replica unless its queue is at `overload`, then to the least loaded.

A key's home is the replica it was last routed to while that replica lives (so scaling out
moves no conversation), else its rendezvous hash over the live replicas (so several ingress
replicas agree without sharing state).
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


def image_key(body: Any) -> str | None:
    """The routing key of a parsed chat body: a digest of its first image's URL, or None."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if isinstance(url, str) and url:
                    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return None


def rendezvous(key: str, replica_ids: list[str]) -> str:
    """The replica with the highest hash of (key, replica): removing one replica moves only its keys."""
    return max(replica_ids, key=lambda r: hashlib.sha256(f"{key}|{r}".encode()).digest())


class Homes:
    """Key -> the replica it was last sent to, the `size` most recent keys."""

    def __init__(self, size: int):
        self.size = size
        self._homes: OrderedDict[str, str] = OrderedDict()

    def home(self, key: str, live: list[str]) -> str:
        """Where `key` should go among the `live` replica ids."""
        known = self._homes.get(key)
        return known if known in live else rendezvous(key, live)

    def record(self, key: str, replica: str) -> None:
        self._homes[key] = replica
        self._homes.move_to_end(key)
        while len(self._homes) > self.size:
            self._homes.popitem(last=False)


def ranks(key: str, live: list[str], homes: Homes, load: Callable[[str], int | None],
          overload: int) -> list[list[str]]:
    """Replica ids in ranks, best first: the key's home alone while its known load is under
    `overload`, then every live replica (of which Serve takes the least loaded)."""
    home = homes.home(key, live)
    known = load(home)
    if known is not None and known >= overload:
        return [live]
    return [[home], live]


class ImageAffinityRouter(RequestRouter):
    """Serve request router: an image key's home unless overloaded, else the least loaded; with
    `by_image` off (or no image), Serve's own choice (the shorter queue of two at random)."""

    def initialize_state(self, overload: int = 32, by_image: bool = True, remember: int = 65536) -> None:
        self.overload = overload
        self.by_image = by_image
        self.homes = Homes(remember)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas, best first; Serve takes the least loaded of the first rank with room."""
        key = pending_request.kwargs.get("image_key") if pending_request is not None else None
        if not self.by_image or key is None or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        chosen = ranks(key, list(by_id), self.homes, lambda r: cache.get(by_id[r].replica_id), self.overload)
        return [[by_id[r] for r in rank] for rank in chosen]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = pending_request.kwargs.get("image_key") if pending_request is not None else None
        if key is not None and self.by_image:
            self.homes.record(key, replica_id.unique_id)
