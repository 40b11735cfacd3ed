"""Running the model on a step the scheduler planned: the KV slots, stored prefixes, image features.

The runner owns every tensor of the continuous loop, and nothing else: the scheduler
(actors/scheduler.py) decides, the runner computes. The language model is transformers' own
modelling code, called with three things it accepts from any caller: `inputs_embeds` (text
embeddings with each image's features written over its placeholder positions, so the model is
never rewired), explicit `position_ids`, a 4D boolean attention mask (which transformers passes
to `sdpa` as it is), and a cache object whose `update` writes this step's keys and values into
the request's slot and returns the slot's keys and values so far.

KV layout: `(layers, slots, kv_heads, slot_tokens, head_dim)` for keys and for values. Running
requests hold slots 0..n-1 (see the scheduler), so a decode step attends over one view
`[:n, :, :longest]` with a mask of each row's length: one attention call per layer for the whole
batch, no gather, no copy. A prefill chunk writes and reads its own slot. The same code runs on
a GPU; there `sdpa` picks its fused kernels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from actors.scheduler import Chunk, Move, PrefixKey, Request

log = logging.getLogger(__name__)


class ImageEncodingError(RuntimeError):
    """The vision tower failed on these images; the requests showing them fail, the rest go on."""

    def __init__(self, digests: list[str], cause: Exception):
        super().__init__(f"image encoding failed: {type(cause).__name__}: {cause}")
        self.digests = digests


@dataclass
class _Step:
    """What the cache object needs for one forward: the rows' slots (a range, read as a view, or
    any slots, gathered), the positions each row writes, and how many positions every row reads."""

    slots: slice | torch.Tensor
    write: torch.Tensor  # (rows, q)
    read: int


class SlotCache:
    """The object transformers' attention calls `update` on: writes this step's keys and values
    into the rows' slots, returns the slots' keys and values up to `read`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, step: _Step):
        self.keys, self.values, self.step = keys, values, step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        step, k, v = self.step, self.keys[layer_idx], self.values[layer_idx]
        ranged = isinstance(step.slots, slice)
        if key_states.shape[2] > 1:  # a prefill chunk: one row, consecutive positions
            slot = step.slots.start if ranged else int(step.slots[0])
            start, end = int(step.write[0, 0]), int(step.write[0, -1]) + 1
            k[slot, :, start:end] = key_states[0]
            v[slot, :, start:end] = value_states[0]
        else:
            rows = torch.arange(step.slots.start, step.slots.stop, device=k.device) if ranged else step.slots
            k[rows, :, step.write[:, 0]] = key_states[:, :, 0]
            v[rows, :, step.write[:, 0]] = value_states[:, :, 0]
        if ranged:
            return k[step.slots, :, : step.read], v[step.slots, :, : step.read]
        return k.index_select(0, step.slots)[:, :, : step.read], v.index_select(0, step.slots)[:, :, : step.read]


class FeatureCache:
    """Encoded images by digest, most recently used last, within a byte budget; an image too large
    for the whole budget is refused."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.used = 0
        self.requested = 0
        self.run = 0
        self.evicted = 0

    def get(self, digest: str) -> torch.Tensor | None:
        features = self.entries.get(digest)
        if features is not None:
            self.entries.move_to_end(digest)
        return features

    def put(self, digest: str, features: torch.Tensor, keep: set[str]) -> None:
        size = features.numel() * features.element_size()
        for old in list(self.entries):
            if self.used + size <= self.budget:
                break
            if old not in keep:
                self.used -= self._bytes(self.entries.pop(old))
                self.evicted += 1
        self.entries[digest] = features
        self.used += size

    @staticmethod
    def _bytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()


class Runner:
    """The model side of the loop: `apply` a plan's moves and evictions, `prefill` chunks, `decode`
    rows; both return logits, which the loop samples."""

    def __init__(self, checkpoint, slots: int, slot_tokens: int, image_cache_bytes: int, vision_batch_tiles: int):
        self.checkpoint = checkpoint
        model = checkpoint.model
        text = model.config.text_config
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.embed = model.get_input_embeddings()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        shape = (text.num_hidden_layers, slots, kv_heads, slot_tokens, head_dim)
        dtype, device = self.embed.weight.dtype, self.embed.weight.device
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.prefixes: dict[PrefixKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.features = FeatureCache(image_cache_bytes)
        self.vision_batch_tiles = vision_batch_tiles
        self.device = device

    @staticmethod
    def kv_bytes_per_token(checkpoint) -> int:
        text = checkpoint.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        element = checkpoint.model.get_input_embeddings().weight.element_size()
        return 2 * text.num_hidden_layers * kv_heads * head_dim * element

    # ---- between steps ------------------------------------------------------------------------

    def apply(self, moves: list[Move], evict: list[PrefixKey]) -> None:
        """Slot compaction (in the order the scheduler decided) and dropped prefixes."""
        for move in moves:
            if move.request.slot is None or move.length == 0:
                continue  # it ended since; nothing of it is read again
            n = move.length
            self.keys[:, move.dst, :, :n] = self.keys[:, move.src, :, :n]
            self.values[:, move.dst, :, :n] = self.values[:, move.src, :, :n]
        for prefix in evict:
            self.prefixes.pop(prefix, None)

    # ---- images -------------------------------------------------------------------------------

    def ensure_features(self, requests: list[Request]) -> None:
        """Encode the images of these requests that are not cached, in batches of bounded tiles."""
        needed = {i.digest for r in requests for i in r.images}
        missing: dict[str, tuple] = {}
        for request in requests:
            for k, image in enumerate(request.images):
                self.features.requested += 1
                if self.features.get(image.digest) is None and image.digest not in missing:
                    missing[image.digest] = request.payload.image_inputs(k)
        batch: list[tuple[str, tuple]] = []
        tiles = 0
        for digest, (image_tiles, size) in [*missing.items(), (None, (None, None))]:
            if digest is not None and (not batch or tiles + image_tiles.shape[0] <= self.vision_batch_tiles):
                batch.append((digest, (image_tiles, size)))
                tiles += image_tiles.shape[0]
                continue
            if batch:
                self._encode(batch, needed)
            batch, tiles = ([(digest, (image_tiles, size))], image_tiles.shape[0]) if digest is not None else ([], 0)

    def _encode(self, batch: list[tuple[str, tuple]], keep: set[str]) -> None:
        try:
            with torch.inference_mode():
                features = self.checkpoint.encode_images([t for _, (t, _) in batch], [s for _, (_, s) in batch])
        except Exception as exc:
            raise ImageEncodingError([d for d, _ in batch], exc) from exc
        self.features.run += len(batch)
        for (digest, _), f in zip(batch, features):
            self.features.put(digest, f, keep)

    def _embeds(self, request: Request, start: int, end: int) -> torch.Tensor:
        """Embeddings of prompt positions [start, end): text looked up, image positions from features."""
        ids = torch.tensor(request.prompt[start:end], dtype=torch.long, device=self.device)
        embeds = self.embed(ids)
        for image in request.images:
            lo, hi = max(start, image.start), min(end, image.start + image.length)
            if lo < hi:
                features = self.features.get(image.digest)
                embeds[lo - start : hi - start] = features[lo - image.start : hi - image.start].to(embeds.dtype)
        return embeds.unsqueeze(0)

    # ---- the model ----------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, chunk: Chunk) -> torch.Tensor | None:
        """Compute one chunk of a prompt into its slot; the logits of its last position when the
        chunk ends the prompt (None otherwise)."""
        request, slot = chunk.request, chunk.request.slot
        if chunk.copy_prefix is not None:
            keys, values = self.prefixes[chunk.copy_prefix]
            self.keys[:, slot, :, : chunk.start] = keys[:, :, : chunk.start]
            self.values[:, slot, :, : chunk.start] = values[:, :, : chunk.start]
        start, end = chunk.start, chunk.end
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        keys_at = torch.arange(end, device=self.device)
        mask = (keys_at.unsqueeze(0) <= positions.transpose(0, 1)).view(1, 1, end - start, end)
        step = _Step(slots=slice(slot, slot + 1), write=positions, read=end)
        hidden = self._forward(self._embeds(request, start, end), positions, mask, step)
        if chunk.store_prefix is not None:
            n = request.prefix_len
            self.prefixes[chunk.store_prefix] = (self.keys[:, slot, :, :n].clone(), self.values[:, slot, :, :n].clone())
        return self.lm_head(hidden[0, -1:]).float()[0] if chunk.last else None

    @torch.inference_mode()
    def decode(self, rows: list[Request], active: list[bool]) -> torch.Tensor:
        """One token for each active row: `(rows, vocab)` logits (inactive rows' are meaningless).

        `rows` are the requests in slots 0..n-1 (read as one view) or, when isolating a failure,
        any requests (gathered). An inactive row is a request still prefilling: it is fed at its
        next prompt position, which its next chunk overwrites, so the view stays contiguous.
        """
        n = len(rows)
        positions = torch.tensor([[r.filled if on else r.computed] for r, on in zip(rows, active)], device=self.device)
        read = int(positions.max()) + 1
        mask = (torch.arange(read, device=self.device).unsqueeze(0) <= positions).view(n, 1, 1, read)
        ids = torch.tensor([r.tokens[-1] if on else 0 for r, on in zip(rows, active)], device=self.device)
        ranged = all(r.slot == i for i, r in enumerate(rows))
        slots = slice(0, n) if ranged else torch.tensor([r.slot for r in rows], device=self.device)
        hidden = self._forward(self.embed(ids).unsqueeze(1), positions, mask, _Step(slots, positions, read))
        return self.lm_head(hidden[:, -1]).float()

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, step: _Step) -> torch.Tensor:
        out = self.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                  cache=SlotCache(self.keys, self.values, step), use_cache=True)
        return out.last_hidden_state

    def stats(self) -> dict[str, int]:
        f = self.features
        return {"image_encodings_requested": f.requested, "image_encodings_run": f.run,
                "image_cache_bytes": f.used, "image_cache_evictions": f.evicted}
