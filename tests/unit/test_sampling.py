"""Choosing tokens: greedy rows take the arg-max, seeded noise depends only on (seed, position),
Gumbel-max samples the softmax, and top-k/top-p keep the right tokens."""

from __future__ import annotations

import torch

from actors.sampling import choose, gumbel, noise_key, top_k, top_p
from pipeline.config import SamplingParams


def test_greedy_rows_take_the_arg_max_whatever_else_the_step_samples():
    logits = torch.randn(3, 50)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.0)]
    chosen = choose(logits.clone(), params, [10, 10, 10])
    assert chosen[0] == int(logits[0].argmax()) and chosen[2] == int(logits[2].argmax())


def test_a_seeded_row_is_the_same_alone_or_amid_others():
    logits = torch.randn(3, 50)
    seeded = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11)
    alone = choose(logits[1:2].clone(), [seeded], [7])
    amid = choose(logits.clone(), [SamplingParams(temperature=1.3, seed=5), seeded, SamplingParams()], [3, 7, 9])
    assert alone[0] == amid[1]


def test_noise_depends_only_on_seed_and_position():
    a = gumbel(torch.tensor([noise_key(7, 3)], dtype=torch.int32), 1000)
    b = gumbel(torch.tensor([noise_key(99, 3), noise_key(7, 3)], dtype=torch.int32), 1000)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], b[0])
    assert noise_key(7, 3) != noise_key(7, 4) and noise_key(0, 0) != 0


def test_gumbel_max_samples_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    keys = torch.tensor([noise_key(s, 0) for s in range(20000)], dtype=torch.int32)
    picks = (logits + gumbel(keys, 4)).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / len(keys)
    assert torch.allclose(freq, logits.softmax(-1), atol=0.015), freq


def test_sampling_at_a_temperature_follows_the_softmax():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]]).repeat(6000, 1)
    params = [SamplingParams(temperature=2.0, seed=s) for s in range(6000)]
    freq = torch.bincount(torch.tensor(choose(logits, params, [0] * 6000)), minlength=4).float() / 6000
    assert torch.allclose(freq, (logits[0] / 2.0).softmax(-1), atol=0.025), freq


def test_top_k_and_top_p_keep_the_best_tokens():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    k = top_k(scores, torch.tensor([2, 0]))
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all() and torch.isfinite(k[1]).all()
    p = top_p(scores, torch.tensor([0.7, 0.85]))
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    assert torch.isfinite(p[1, :3]).all() and torch.isinf(p[1, 3])
