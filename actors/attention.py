"""Attention for the continuous loop on CPU: each request attends only to its own keys.

transformers' loop runs every request of a step as one packed sequence. With `sdpa` it builds a
dense mask over all queries and all keys of the step, so a decode step of B requests of L tokens
costs B x (B x L) instead of B x L, and long prompts make the loop slower than static batches.
Flash-attention kernels take the packed sequence natively on a GPU; on CPU this function does
the same with one `scaled_dot_product_attention` call per request, slicing the packed queries
and keys at the cumulative lengths the loop passes (`cu_seq_lens_q`, `cu_seq_lens_k`). Any other
call (the static path's `generate`) goes to transformers' own `sdpa`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "llava_packed_sdpa"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`(1, heads, q, d)` queries over `(1, kv_heads, k, d)` keys -> `(1, q, heads, d)`, per request."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    gqa = query.shape[1] != key.shape[1]
    out = query.new_zeros(query.shape[2], query.shape[1], query.shape[3])
    for r in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[r], bounds_q[r + 1], bounds_k[r], bounds_k[r + 1]
        if q1 <= q0:
            continue
        length_q, length_k = q1 - q0, k1 - k0
        mask = None
        if length_q > 1 or sliding_window:
            positions = torch.arange(length_k - length_q, length_k, device=query.device).unsqueeze(1)
            keys = torch.arange(length_k, device=query.device).unsqueeze(0)
            mask = keys <= positions
            if sliding_window:
                mask &= keys > positions - sliding_window
        attended = F.scaled_dot_product_attention(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], attn_mask=mask, scale=scaling, enable_gqa=gqa,
        )
        out[q0:q1] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(NAME, packed_sdpa)
# Calls outside the loop (padded batches of `generate`) need the masks `sdpa` gets.
AttentionMaskInterface.register(NAME, sdpa_mask)
