"""Running the model on a step the scheduler planned: the KV slots, stored prefixes, image features.

The runner owns every tensor of the continuous loop, and nothing else: the scheduler
(actors/scheduler.py) decides, the runner computes. A step is one forward of transformers' own
decoder layers over a packed sequence: the embeddings of the prompt chunks being prefilled (text
looked up, each image's features written over its placeholder positions, so the model is never
rewired) followed by the last token of every decoding request, with explicit positions; the
attention of each part reads its own slot (actors/attention.py).

KV layout: `(layers, slots, kv_heads, slot_tokens, head_dim)` for keys and for values. Running
requests hold slots 0..n-1 (see the scheduler), so the decode rows attend over one view
`[:n, :, :longest]` with a mask of each row's length: one attention call per layer for all of
them, no gather, no copy. The same code runs on a GPU; there `sdpa` picks its fused kernels.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from actors import attention
from actors.attention import ChunkSpan, DecodeSpan, SlotStep
from actors.scheduler import Chunk, Move, PrefixKey, Request

log = logging.getLogger(__name__)


class ImageEncodingError(RuntimeError):
    """The vision tower failed on these images; the requests showing them fail, the rest go on."""

    def __init__(self, digests: list[str], cause: Exception):
        super().__init__(f"image encoding failed: {type(cause).__name__}: {cause}")
        self.digests = digests


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
        attention.install(model)

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
        return embeds

    # ---- the model ----------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], view: list[Request], active: list[bool]) -> tuple[list[Request], torch.Tensor]:
        """One forward over prompt chunks and decode rows together (see actors/attention.py).

        `view` are the requests in slots 0..n-1 (or, when isolating a failure, any requests) and
        `active` says which of them decode; the others are still prefilling and ride along.
        Returns the requests that get a token (chunks that end their prompt, then the active
        rows) and their `(requests, vocab)` logits.
        """
        embeds, positions, spans, picks, chosen = [], [], [], [], []
        at = 0
        for chunk in chunks:
            request, n = chunk.request, chunk.end - chunk.start
            if chunk.copy_prefix is not None:
                keys, values = self.prefixes[chunk.copy_prefix]
                self.keys[:, request.slot, :, : chunk.start] = keys[:, :, : chunk.start]
                self.values[:, request.slot, :, : chunk.start] = values[:, :, : chunk.start]
            embeds.append(self._embeds(request, chunk.start, chunk.end))
            positions.append(torch.arange(chunk.start, chunk.end, device=self.device))
            spans.append(ChunkSpan(at, at + n, request.slot, chunk.start, chunk.end))
            if chunk.last:
                picks.append(at + n - 1)
                chosen.append(request)
            at += n
        decode = None
        if view:
            rows = torch.tensor([r.filled if on else r.computed for r, on in zip(view, active)], device=self.device)
            read = int(rows.max()) + 1
            mask = (torch.arange(read, device=self.device).unsqueeze(0) <= rows.unsqueeze(1)).view(len(view), 1, 1, read)
            ranged = all(r.slot == i for i, r in enumerate(view))
            slots = slice(0, len(view)) if ranged else torch.tensor([r.slot for r in view], device=self.device)
            decode = DecodeSpan(at, at + len(view), slots, rows, mask)
            ids = torch.tensor([r.tokens[-1] if on else 0 for r, on in zip(view, active)], device=self.device)
            embeds.append(self.embed(ids))
            positions.append(rows)
            picks += [at + i for i, on in enumerate(active) if on]
            chosen += [r for r, on in zip(view, active) if on]
        step = SlotStep(self.keys, self.values, spans, decode)
        hidden = self._forward(torch.cat(embeds).unsqueeze(0), torch.cat(positions).unsqueeze(0), step)
        for chunk in chunks:
            if chunk.store_prefix is not None:
                slot, n = chunk.request.slot, chunk.request.prefix_len
                self.prefixes[chunk.store_prefix] = (self.keys[:, slot, :, :n].clone(),
                                                     self.values[:, slot, :, :n].clone())
        logits = self.lm_head(hidden[0, torch.tensor(picks, device=self.device)]).float() if picks else None
        return chosen, logits

    @torch.inference_mode()
    def score(self, request: Request, first_logits: torch.Tensor, continuations: list[list[int]]) -> list:
        """For each continuation of the request's whole prompt (which its slot holds), the
        `(tokens, vocab)` log-probabilities each of its tokens was chosen from; None for one that
        would not fit the slot.

        The first token's come from the prompt's last logits; the rest from one forward of the
        continuation at the positions after the prompt, which the answer's own tokens overwrite
        later (a slot holds the prompt and a whole answer).
        """
        start, slot = len(request.prompt), request.slot
        first = first_logits.float().log_softmax(dim=-1).unsqueeze(0)
        out = []
        for tokens in continuations:
            if start + len(tokens) - 1 > self.keys.shape[3]:
                out.append(None)
                continue
            rows = [first]
            if len(tokens) > 1:
                fed = torch.tensor(tokens[:-1], device=self.device)
                end = start + len(fed)
                step = SlotStep(self.keys, self.values, [ChunkSpan(0, len(fed), slot, start, end)])
                positions = torch.arange(start, end, device=self.device).unsqueeze(0)
                hidden = self._forward(self.embed(fed).unsqueeze(0), positions, step)
                rows.append(self.lm_head(hidden[0]).float().log_softmax(dim=-1))
            out.append(torch.cat(rows))
        return out

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, step: SlotStep) -> torch.Tensor:
        """The language model's layers over the packed step (its own forward, minus the mask and
        cache machinery: `slot_attention` reads and writes the slots itself)."""
        lm = self.language_model
        rotary = lm.rotary_emb(embeds, position_ids=positions)
        hidden = embeds
        for layer in lm.layers[: lm.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary,
                           llava_step=step)
        return lm.norm(hidden)

    def stats(self) -> dict[str, int]:
        f = self.features
        return {"image_encodings_requested": f.requested, "image_encodings_run": f.run,
                "image_cache_bytes": f.used, "image_cache_evictions": f.evicted}
