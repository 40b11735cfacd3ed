"""Attention for the continuous loop's mixed steps: prompt chunks and decode rows in one forward.

A step is one packed sequence: the chunks of the prompts being prefilled, then one position for
each decoding request. The linear layers run over all of it at once; attention cannot, since each
part reads its own slot of the KV cache. transformers lets a caller name the attention function
of a model, and passes the caller's keyword arguments through to it, so the runner registers
`slot_attention` and calls the layers with `llava_step=` a `SlotStep`: the function writes the
step's keys and values into the slots and computes, per layer:
- each chunk: `sdpa` over its slot up to its end, causal (from position 0 without a mask);
- all decode rows at once: `sdpa` over the view of slots 0..n-1 with a mask of each row's
  length (requests still prefilling inside that range ride along and their output is dropped;
  the position they write is the one their next chunk overwrites).
Any other call (the static scheduler's `generate`, the vision tower) has no `llava_step` and goes
to the attention the checkpoint was loaded with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "llava_slots"
FALLBACK = "llava_attention_fallback"  # set on the text config: the attention every other call gets


def install(model: torch.nn.Module) -> None:
    """Give the language model `slot_attention`, keeping its own attention for every other call."""
    text = model.config.text_config
    if text._attn_implementation != NAME:
        setattr(text, FALLBACK, text._attn_implementation)
        model.set_attn_implementation({"text_config": NAME})


@dataclass(frozen=True)
class ChunkSpan:
    """Packed positions [q0, q1) are prompt positions [start, end) of the request in `slot`."""

    q0: int
    q1: int
    slot: int
    start: int
    end: int


@dataclass
class DecodeSpan:
    """Packed positions [q0, q1) are one position per row of `slots` (a range, read as one view, or
    any slots, gathered), written at `positions`, each row reading `mask`'s true positions."""

    q0: int
    q1: int
    slots: slice | torch.Tensor
    positions: torch.Tensor  # (rows,)
    mask: torch.Tensor  # (rows, 1, 1, read)


@dataclass
class SlotStep:
    """What `slot_attention` needs for one forward: the cache and how the packed sequence maps to it."""

    keys: torch.Tensor  # (layers, slots, kv_heads, slot_tokens, head_dim)
    values: torch.Tensor
    chunks: list[ChunkSpan] = field(default_factory=list)
    decode: DecodeSpan | None = None


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """`(1, heads, T, d)` packed queries -> `(1, T, heads, d)`; see the module docstring."""
    step: SlotStep | None = kwargs.pop("llava_step", None)
    if step is None:
        implementation = ALL_ATTENTION_FUNCTIONS[getattr(module.config, FALLBACK, "sdpa")]
        return implementation(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    k_cache, v_cache = step.keys[module.layer_idx], step.values[module.layer_idx]
    decode = step.decode
    if decode is not None:  # first: a prefilling request's dummy write is then overwritten by its chunk
        rows = torch.arange(decode.slots.start, decode.slots.stop, device=key.device) \
            if isinstance(decode.slots, slice) else decode.slots
        k_cache[rows, :, decode.positions] = key[0, :, decode.q0:decode.q1].transpose(0, 1)
        v_cache[rows, :, decode.positions] = value[0, :, decode.q0:decode.q1].transpose(0, 1)
    for c in step.chunks:
        k_cache[c.slot, :, c.start:c.end] = key[0, :, c.q0:c.q1]
        v_cache[c.slot, :, c.start:c.end] = value[0, :, c.q0:c.q1]
    heads, dim = query.shape[1], query.shape[3]
    out = query.new_empty(1, query.shape[2], heads, dim)
    for c in step.chunks:
        q = query[:, :, c.q0:c.q1]
        k, v = k_cache[c.slot:c.slot + 1, :, :c.end], v_cache[c.slot:c.slot + 1, :, :c.end]
        mask = None
        if c.start > 0:  # after copied or earlier KV: each position sees every earlier one
            positions = torch.arange(c.start, c.end, device=query.device).unsqueeze(1)
            mask = torch.arange(c.end, device=query.device).unsqueeze(0) <= positions
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and c.start == 0,
                                                  scale=scaling, enable_gqa=True)
        out[0, c.q0:c.q1] = attended[0].transpose(0, 1)
    if decode is not None:
        n, read = decode.q1 - decode.q0, decode.mask.shape[-1]
        kv_heads = k_cache.shape[1]
        if isinstance(decode.slots, slice):
            k, v = k_cache[decode.slots, :, :read], v_cache[decode.slots, :, :read]
        else:
            k, v = k_cache.index_select(0, decode.slots)[:, :, :read], v_cache.index_select(0, decode.slots)[:, :, :read]
        # A row's heads grouped by the key/value head they share: (rows, kv_heads, group, d).
        q = query[0, :, decode.q0:decode.q1].transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)
        attend = F.scaled_dot_product_attention if fused_decode(query.device) else unfused_decode
        attended = attend(q, k, v, attn_mask=decode.mask, scale=scaling)
        out[0, decode.q0:decode.q1] = attended.reshape(n, heads, dim)
    return out, None


def fused_decode(device: torch.device) -> bool:
    """Whether decode rows attend through `sdpa` (CUDA: fused kernels that read the cache once)."""
    return device.type == "cuda"


def unfused_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """Decode attention as two matrix products, for CPUs: `(rows, kv_heads, group, d)` queries.

    A decode row has one position per head, so a row's heads that share a key/value head are
    `group` queries against its cached keys: `queries @ keys^T` reads each key row once and gives
    the scores laid out as softmax and the second product read them (rows, kv_heads, group,
    read), contiguous. Measured here on one core (32 rows, 2 key/value heads of 2 queries, 800
    positions, float32): 2.4 ms for the whole call, where `keys @ queries^T` (scores transposed,
    so the scaling, mask and softmax ran over a strided view) took 7.1 ms and CPU `sdpa` 2.4-3.5
    ms. Same math as `sdpa`; the sums run in another order, so logits agree to rounding (tokens
    are checked against `generate` and vLLM).
    """
    scores = torch.matmul(q, k.transpose(-1, -2))  # (rows, kv_heads, group, read)
    scores = scores.mul_(q.shape[-1] ** -0.5 if scale is None else scale)
    scores = scores.masked_fill_(~attn_mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(scores, v)


AttentionInterface.register(NAME, slot_attention)
# Calls outside the loop (padded batches of `generate`) need the masks `sdpa` gets.
AttentionMaskInterface.register(NAME, sdpa_mask)
