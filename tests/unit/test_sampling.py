"""Per-request sampling inside the step: greedy rows untouched, seeded noise that depends only on
(seed, position), and top-k/top-p that keep the right tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from actors.sampling import SeededNoise, Temperature, TopK, TopP, gumbel, noise_key


def _states(*params):
    return [SimpleNamespace(state=SimpleNamespace(logit_processor_kwargs=p, position_offset=10)) for p in params]


@pytest.mark.parametrize("branch_free", [True, False])
def test_greedy_rows_are_left_exactly_as_they_are(branch_free):
    scores = torch.randn(2, 50)
    rows = _states({}, {"temperature": 0.0})
    out = scores.clone()
    for proc in (Temperature(branch_free), TopK(branch_free), TopP(branch_free), SeededNoise(branch_free)):
        out = proc(out, proc.prepare_tensor_args(rows))
    assert torch.equal(out, scores)


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


def test_top_k_and_top_p_keep_the_best_tokens():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    k = TopK()(scores, TopK().prepare_tensor_args(_states({"top_k": 2}, {"top_k": 0})))
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all() and torch.isfinite(k[1]).all()
    p = TopP()(scores, TopP().prepare_tensor_args(_states({"top_p": 0.7}, {"top_p": 0.85})))
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    assert torch.isfinite(p[1, :3]).all() and torch.isinf(p[1, 3])
