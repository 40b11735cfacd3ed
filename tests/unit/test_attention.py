"""The CPU's decode attention against `sdpa`, which a GPU runs (actors/attention.py)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from actors.attention import fused_decode, unfused_decode


def test_unfused_decode_equals_sdpa_to_rounding_with_each_rows_length():
    """Rows of different lengths over one view of the cache, heads grouped by their key/value
    head; positions past a row's length never count (changing them changes nothing)."""
    torch.manual_seed(0)
    rows, kv_heads, group, dim, read = 5, 2, 3, 16, 40
    q = torch.randn(rows, kv_heads, group, dim)
    k, v = torch.randn(rows, kv_heads, read, dim), torch.randn(rows, kv_heads, read, dim)
    lengths = torch.tensor([1, 7, 40, 23, 12])
    mask = (torch.arange(read).unsqueeze(0) < lengths.unsqueeze(1)).view(rows, 1, 1, read)
    ours = unfused_decode(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3), atol=1e-6)
    assert torch.allclose(unfused_decode(q, k, v, attn_mask=mask),
                          F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 1:], v2[0, :, 1:] = 1e3, -1e3  # past row 0's single position
    assert torch.equal(unfused_decode(q, k2, v2, attn_mask=mask)[0], unfused_decode(q, k, v, attn_mask=mask)[0])


def test_only_cuda_takes_the_fused_kernel():
    assert fused_decode(torch.device("cuda")) and not fused_decode(torch.device("cpu"))
