"""The loop's packed attention on CPU equals attention over the step with transformers' own
block-diagonal causal mask, and calls from outside the loop go to `sdpa` unchanged."""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.utils import build_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from actors.attention import packed_sdpa


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_packed_equals_the_masked_step():
    torch.manual_seed(0)
    cu_q, cu_k = [0, 1, 23, 91, 95], [0, 75, 145, 213, 300]  # decode, prefix-matched, fresh, chunk
    query = torch.randn(1, 4, cu_q[-1], 16)
    key, value = torch.randn(1, 2, cu_k[-1], 16), torch.randn(1, 2, cu_k[-1], 16)
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q, cu_k)
    kwargs = {"cu_seq_lens_q": torch.tensor(cu_q), "cu_seq_lens_k": torch.tensor(cu_k)}
    got, _ = packed_sdpa(_Module(), query, key, value, None, scaling=0.25, **kwargs)
    want, _ = sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.25)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)


def test_calls_outside_the_loop_are_plain_sdpa():
    query, key, value = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    got, _ = packed_sdpa(_Module(), query, key, value, None, scaling=0.25)
    want, _ = sdpa_attention_forward(_Module(), query, key, value, None, scaling=0.25)
    assert torch.equal(got, want)
