"""Choosing each request's next token from the step's logits: greedy, or sampled with its own
temperature, top-k, top-p and seed.

A greedy row (temperature 0) takes the arg-max of its logits, exactly the token `generate` picks.
A sampled row takes the arg-max of `logits / T + Gumbel noise` over the tokens its top-k and top-p
keep, which is a sample from `softmax(logits / T)` restricted to them; the noise is drawn from a
hash of (its seed, the position of the token being chosen), so a seeded answer is the same alone
or amid any other traffic, on any device. Only the sampled rows of a step pay for sorting and
noise. A constrained row's logits arrive with its disallowed tokens already at -inf
(actors/answer.py `constrain`).
"""

from __future__ import annotations

import torch

from pipeline.config import SamplingParams

MASK64 = (1 << 64) - 1
# splitmix64's multipliers, as the signed 64-bit values torch computes with.
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def noise_key(seed: int, position: int) -> int:
    """A non-zero 31-bit key for one (seed, token position)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 1) & MASK64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 29
    return (x & 0x7FFFFFFF) or 1


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts arithmetically, copying the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise `(rows, vocab)` from one key per row (splitmix64 of key and token index),
    identical on every device."""
    k = keys.to(torch.int64).unsqueeze(-1)
    z = k * _GOLDEN + torch.arange(vocab, device=keys.device, dtype=torch.int64).unsqueeze(0)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u = (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k best scores (k = 0 keeps all)."""
    vocab = scores.size(-1)
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    ordered = torch.sort(scores, dim=-1, descending=True).values
    threshold = ordered.gather(-1, (k - 1).unsqueeze(-1))
    return scores.masked_fill(scores < threshold, float("-inf"))


def top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches p (p = 1 keeps all)."""
    p = p.unsqueeze(-1)
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    # A token goes when the better tokens before it already reach p; the best one always stays.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop_sorted &= p < 1.0
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def choose(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """The next token of each row of `(rows, vocab)` logits (see the module docstring)."""
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        device = logits.device
        rows = torch.tensor(sampled, device=device)
        scores = logits[rows] / torch.tensor([params[i].temperature for i in sampled], device=device).unsqueeze(-1)
        k = torch.tensor([params[i].top_k for i in sampled], device=device)
        if bool((k > 0).any()):
            scores = top_k(scores, k)
        p = torch.tensor([params[i].top_p for i in sampled], device=device, dtype=torch.float32)
        if bool((p < 1.0).any()):
            scores = top_p(scores, p)
        keys = torch.tensor([noise_key(int(params[i].seed or 0), positions[i]) for i in sampled], device=device)
        chosen[rows] = (scores + gumbel(keys, scores.size(-1))).argmax(dim=-1)
    return chosen.tolist()
