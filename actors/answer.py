"""One answer's state beside its tokens: the matcher that constrains it, its log-probabilities,
and the logits its choices are scored from.

Both schedulers keep one `Answer` per request and hand every chosen token to `take` with the raw
logits it was chosen from, so a log-probability is always the model's (log-softmax before
temperature and masks) and a constrained answer's matcher always knows every token.

With choice probabilities asked for, every choice is scored as the whole answer (its tokens and
end-of-sequence) after the prompt; a greedy answer is then the most probable choice, which token by
token greedy decoding need not find (it may take "circles" where "circle" is likelier as a whole).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.constraints import allowed
from pipeline.config import SamplingParams


@dataclass(eq=False)
class Answer:
    """`matcher` is None without a constraint; `token_logprobs` None unless asked for."""

    params: SamplingParams
    matcher: Any = None
    logprob: float = 0.0
    token_logprobs: list[dict] | None = None
    first_logits: torch.Tensor | None = None

    @classmethod
    def start(cls, params: SamplingParams, grammars: Any) -> "Answer":
        """A new answer; raises ConstraintError when its constraint does not compile."""
        matcher = grammars.matcher(params.constraint) if params.constraint is not None else None
        return cls(params, matcher, token_logprobs=[] if params.logprobs is not None else None)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows no more tokens."""
        return self.matcher is not None and self.matcher.is_stopped()

    def incomplete(self, made: int) -> str | None:
        """The row error of a constrained answer that ran out of tokens before its grammar ended."""
        if self.matcher is None or self.matcher.is_accepting():
            return None
        kind = {"json_schema": "schema", "choice": "choice", "regex": "regex", "grammar": "grammar"}
        return f"generate: the answer did not complete the {kind[self.params.constraint.kind]} within {made} tokens"

    def record(self, token: int, logp: torch.Tensor) -> None:
        """One token and the log-probabilities `(vocab,)` it was chosen from."""
        lp = float(logp[token])
        self.logprob += lp
        if self.token_logprobs is not None:
            top = []
            if self.params.logprobs:
                values, ids = logp.topk(self.params.logprobs)
                top = [{"token": int(t), "logprob": float(v)} for v, t in zip(values.tolist(), ids.tolist())]
            self.token_logprobs.append({"token": int(token), "logprob": lp, "top": top})

    def settle(self, tokens: list[int], logp: torch.Tensor) -> None:
        """The answer is these tokens (the most probable choice), each chosen from a row of `logp`."""
        self.logprob = 0.0
        if self.token_logprobs is not None:
            self.token_logprobs = []
        for k, token in enumerate(tokens):
            self.record(token, logp[k])

    def fields(self) -> dict[str, Any]:
        """The answer's own fields of its GenerationResult."""
        return {"logprob": self.logprob, "token_logprobs": self.token_logprobs}


@dataclass
class MaskTimes:
    """What constraints cost the loop, summed over its steps: computing the allowed tokens
    (llguidance, on the CPU), masking the logits with them, and advancing the matchers by the
    chosen tokens. All of it adds to the step, on a GPU too: the runner has waited for the
    forward by the time the masks are asked for."""

    rows: int = 0
    compute_s: float = 0.0
    apply_s: float = 0.0
    advance_s: float = 0.0

    def stats(self) -> dict[str, float]:
        return {"masked_rows": self.rows, "mask_compute_s": round(self.compute_s, 4),
                "mask_apply_s": round(self.apply_s, 4), "matcher_advance_s": round(self.advance_s, 4)}


def constrain(answers: list[Answer], logits: torch.Tensor, times: MaskTimes | None = None) -> torch.Tensor:
    """The step's logits with every token a row's constraint forbids at -inf: a new tensor, so
    `logits` stay raw for log-probabilities; `logits` themselves when no row is constrained."""
    rows = [i for i, a in enumerate(answers) if a.matcher is not None]
    if not rows:
        return logits
    start = time.perf_counter()
    ok = allowed([answers[i].matcher for i in rows], logits.shape[-1], logits.device)
    computed = time.perf_counter()
    if len(rows) == len(answers):
        out = logits.masked_fill(~ok, float("-inf"))
    else:
        out = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        out[index] = logits[index].masked_fill(~ok, float("-inf"))
    if times is not None:
        times.rows += len(rows)
        times.compute_s += computed - start
        times.apply_s += time.perf_counter() - computed
    return out


def take(answers: list[Answer], logits: torch.Tensor, tokens: list[int], first: list[bool],
         times: MaskTimes | None = None) -> None:
    """Give each answer its chosen token with the raw logits it came from (rows of `logits`);
    `first` marks the rows whose token is their answer's first (their logits score the choices)."""
    logp = logits.float().log_softmax(dim=-1)
    for row, (answer, token) in enumerate(zip(answers, tokens)):
        answer.record(token, logp[row])
        if first[row] and answer.params.choice_probs:
            answer.first_logits = logits[row].float().clone()
    start = time.perf_counter()
    for answer, token in zip(answers, tokens):
        if answer.matcher is not None and not answer.matcher.is_stopped():
            answer.matcher.consume_token(int(token))
    if times is not None:
        times.advance_s += time.perf_counter() - start


def choice_probs(choices: "ChoiceTokens", rows: list) -> tuple[dict[str, float], int]:
    """Each choice's probability as the whole answer, normalised over the choices, from the
    log-probability rows its tokens were chosen from (None: it could not be scored); and the index
    of the most probable one."""
    totals = [float(r.gather(1, torch.tensor(ids, device=r.device).unsqueeze(1)).sum()) if r is not None
              else float("-inf") for ids, r in zip(choices.ids, rows)]
    values = torch.tensor(totals, dtype=torch.float64).softmax(dim=0).tolist()
    return dict(zip(choices.options, values)), max(range(len(totals)), key=totals.__getitem__)


@dataclass
class ChoiceTokens:
    """The token ids each choice is scored as: its text as the tokenizer writes it, then end-of-sequence."""

    options: list[str]
    ids: list[list[int]] = field(default_factory=list)

    @classmethod
    def of(cls, options: list[str], tokenizer: Any, eos: int) -> "ChoiceTokens":
        return cls(options, [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in options])
