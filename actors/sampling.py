"""Per-request sampling inside the continuous-batching step: temperature, top-k, top-p and a seed.

The step loop always picks the arg-max of the processed scores. Each request brings its own
temperature, top-k and top-p, and a sampled request adds Gumbel noise drawn from a hash of
(its seed, the position of the token being chosen): the arg-max of `logits / T + Gumbel` is a
sample from `softmax(logits / T)`, and the noise depends on nothing but the request itself, so a
seeded answer is the same alone or amid any other traffic. A greedy request (temperature 0)
leaves its scores untouched, so its tokens are the arg-max `generate` would choose.

Where CUDA graphs may capture the step (`branch_free`), every operation is branch-free over the
batch; elsewhere a processor skips its work when no row of the step needs it (an all-greedy step
costs no sort). Each processor gets one int32 per row (a float is passed as its bit pattern).
"""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

MASK64 = (1 << 64) - 1
# splitmix64's multipliers, as the signed 64-bit values torch computes with.
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _float_bits(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


def noise_key(seed: int, position: int) -> int:
    """A non-zero 31-bit key for one (seed, token position); 0 is reserved for "no noise"."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 1) & MASK64
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x ^= x >> 29
    return (x & 0x7FFFFFFF) or 1


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts arithmetically, copying the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def gumbel(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise `(rows, vocab)` from one int32 key per row (splitmix64 of key and token index),
    identical on every device."""
    k = keys.to(torch.int64).unsqueeze(-1)
    z = k * _GOLDEN + torch.arange(vocab, device=keys.device, dtype=torch.int64).unsqueeze(0)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u = (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


class _RowProcessor(ContinuousBatchingLogitsProcessor):
    """A processor fed one value per row; greedy rows get the value that changes nothing."""

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, branch_free: bool = True):
        self.branch_free = branch_free

    def idle(self, needed: torch.Tensor) -> bool:
        """True when this step may skip the processor: no row needs it and nothing is captured."""
        return not self.branch_free and not bool(needed.any())

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(self._values([None] * int32_tensor.numel()))

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        return self._values([r.state for r in requests_with_new_token])

    def _values(self, states) -> torch.Tensor:
        raise NotImplementedError


def _param(state, name: str, default):
    if state is None:
        return default
    return state.logit_processor_kwargs.get(name, default)


class Temperature(_RowProcessor):
    """Divides a sampled row's scores by its temperature (greedy rows by 1, exactly)."""

    supported_kwargs = {"temperature": float}

    def _values(self, states) -> torch.Tensor:
        temps = [float(_param(s, "temperature", 0.0)) for s in states]
        return _float_bits([t if t > 0 else 1.0 for t in temps])

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        temperature = tensor_arg[: scores.size(0)].view(torch.float32)
        if self.idle(temperature != 1.0):
            return scores
        return scores / temperature.unsqueeze(-1)


class TopK(_RowProcessor):
    """Keeps a row's k best scores; k = 0 keeps all."""

    supported_kwargs = {"top_k": int}

    def _values(self, states) -> torch.Tensor:
        return torch.tensor([int(_param(s, "top_k", 0)) for s in states], dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        vocab = scores.size(-1)
        k = tensor_arg[: scores.size(0)].to(torch.int64)
        if self.idle(k > 0):
            return scores
        k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
        ordered = torch.sort(scores, dim=-1, descending=True).values
        threshold = ordered.gather(-1, (k - 1).unsqueeze(-1))
        return scores.masked_fill(scores < threshold, float("-inf"))


class TopP(_RowProcessor):
    """Keeps the smallest set of best tokens whose probability reaches p; p = 1 keeps all."""

    supported_kwargs = {"top_p": float}

    def _values(self, states) -> torch.Tensor:
        return _float_bits([float(_param(s, "top_p", 1.0)) for s in states])

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        p = tensor_arg[: scores.size(0)].view(torch.float32).unsqueeze(-1)
        if self.idle(p < 1.0):
            return scores
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # A token goes when the better tokens before it already reach p; the best one always stays.
        drop_sorted = (cumulative - ordered.softmax(dim=-1)) >= p
        drop_sorted[..., 0] = False
        drop_sorted &= p < 1.0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))


class SeededNoise(_RowProcessor):
    """Adds Gumbel noise keyed by (seed, position) to sampled rows; greedy rows get none."""

    supported_kwargs = {"seed": int, "temperature": float}

    def _values(self, states) -> torch.Tensor:
        keys = []
        for s in states:
            sampled = s is not None and float(_param(s, "temperature", 0.0)) > 0
            keys.append(noise_key(int(_param(s, "seed", 0)), s.position_offset) if sampled else 0)
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        keys = tensor_arg[: scores.size(0)]
        if self.idle(keys != 0):
            return scores
        noise = gumbel(keys, scores.size(-1))
        return scores + torch.where((keys != 0).unsqueeze(-1), noise, torch.zeros_like(noise))


def sampling_processors(branch_free: bool) -> ContinuousBatchingLogitsProcessorList:
    """The processor list the step loop runs: each request's own temperature, top-k, top-p, seed."""
    processors = [cls(branch_free) for cls in (Temperature, TopK, TopP, SeededNoise)]
    chain = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(processors), per_request_processors=False)
    chain.tensors_required = len(processors)  # one row of per-request arguments each
    return chain
