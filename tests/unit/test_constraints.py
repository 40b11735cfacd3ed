"""Constrained answers through the engine: equal to transformers' `generate` with the same backend's
processor, valid by construction on a model that otherwise babbles, choice probabilities and token
log-probabilities equal to a direct computation from the model's logits."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch
from transformers import LogitsProcessorList

from actors.constraints import ConstraintError, GrammarProcessor
from pipeline.config import Constraint, SamplingParams
from pipeline.preprocess import decode, prepare
from pipeline.schemas import GenerationRequest
from tests.helpers import BOUNDED_SCHEMA, encode, noise_image

SCHEMA = BOUNDED_SCHEMA
CHOICES = ["circle", "circles", "square", "triangle"]  # shared first tokens: "ci...", and a prefix of another
ZOO = [Constraint.json_schema(SCHEMA), Constraint.choices(CHOICES), Constraint("regex", r"[0-9]{2,3}( cm)?"),
       Constraint("grammar", 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/')]


def _image(seed: int) -> bytes:
    return encode(noise_image(40 + 7 * seed, 50 - 3 * seed, seed=300 + seed))


def _request(engine, seed: int, question: str, params: SamplingParams) -> GenerationRequest:
    p = prepare(_image(seed), engine.spec)
    return GenerationRequest(engine.format_question(question, 1), [p.tiles], [p.size], params, [p.digest])


def _inputs(reference, seed: int, prompt: str) -> dict:
    processor, _ = reference
    return processor(images=[decode(_image(seed))], text=prompt, return_tensors="pt")


def _reference(reference, engine, seed: int, prompt: str, constraint: Constraint, new: int) -> list[int]:
    """transformers' `generate` on the processor's inputs, masked by the same backend, greedy."""
    _, model = reference
    inputs = _inputs(reference, seed, prompt)
    processor = GrammarProcessor([engine.grammars.matcher(constraint)], engine.pad_id)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, logits_processor=LogitsProcessorList([processor]))
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    check = engine.grammars.matcher(constraint)
    for k, t in enumerate(tokens):  # as the engine does: the answer ends where its grammar does
        check.consume_token(t)
        if t in engine.eos_ids or check.is_stopped():
            return tokens[: k + 1]
    return tokens


def test_greedy_constrained_tokens_equal_the_reference_amid_free_and_sampled_rows(any_engine, reference):
    engine = any_engine
    rows = [_request(engine, k, "Describe the image.", SamplingParams(max_new_tokens=80, constraint=c))
            for k, c in enumerate(ZOO)]
    free = _request(engine, 7, "What is shown?", SamplingParams(max_new_tokens=10))
    sampled = _request(engine, 8, "What is shown?", SamplingParams(max_new_tokens=10, temperature=0.9, seed=4))
    results = engine.generate(rows + [free, sampled])
    for k, (row, got) in enumerate(zip(rows, results)):
        assert got.error is None, got.error
        assert got.token_ids == _reference(reference, engine, k, row.prompt, row.params.constraint, 80), ZOO[k]
    assert all(r.error is None for r in results[-2:])
    jsonschema.validate(json.loads(results[0].response), SCHEMA)
    assert results[1].response in CHOICES
    assert results[2].response[:2].isdigit()


def test_every_answer_under_a_schema_is_valid_on_a_model_that_babbles(engine):
    rows = [_request(engine, k % 9, q, SamplingParams(max_new_tokens=120, constraint=ZOO[0]))
            for k, q in enumerate(["Describe.", "What is it?", "Count them.", "Colours?"] * 3)]
    for result in engine.generate(rows):
        assert result.error is None and result.finish_reason == "stop", result.error
        jsonschema.validate(json.loads(result.response), SCHEMA)
        assert " " not in result.response  # compact JSON: no layout


def test_choice_probabilities_equal_a_forward_over_prompt_and_choice(any_engine, reference):
    engine = any_engine
    params = SamplingParams(max_new_tokens=8, constraint=Constraint.choices(CHOICES), choice_probs=True)
    request = _request(engine, 3, "What shape is in the image?", params)
    result = engine.generate([request])[0]
    _, model = reference
    inputs = _inputs(reference, 3, request.prompt)
    scores = []
    for choice in CHOICES:
        tokens = engine.tokenizer(choice, add_special_tokens=False)["input_ids"] + [min(engine.eos_ids)]
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
        with torch.inference_mode():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
        logp = logits[0, inputs["input_ids"].shape[1] - 1:].log_softmax(-1)
        scores.append(float(logp.gather(1, torch.tensor(tokens).unsqueeze(1)).sum()))
    expected = torch.tensor(scores, dtype=torch.float64).softmax(0).tolist()
    assert list(result.choice_probs) == CHOICES
    assert abs(sum(result.choice_probs.values()) - 1.0) < 1e-9
    for choice, p in zip(CHOICES, expected):
        assert abs(result.choice_probs[choice] - p) < 1e-4
    assert result.response == max(result.choice_probs, key=result.choice_probs.get)


def test_log_probabilities_equal_the_log_softmax_of_the_reference_logits(any_engine, reference):
    engine = any_engine
    params = SamplingParams(max_new_tokens=10, logprobs=3, constraint=ZOO[2])
    request = _request(engine, 5, "How long is it?", params)
    result = engine.generate([request])[0]
    _, model = reference
    inputs = _inputs(reference, 5, request.prompt)
    ids = torch.cat([inputs["input_ids"], torch.tensor([result.token_ids[:-1]])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
    logp = logits[0, inputs["input_ids"].shape[1] - 1:].log_softmax(-1)
    assert len(result.token_logprobs) == len(result.token_ids)
    for k, entry in enumerate(result.token_logprobs):
        assert entry["token"] == result.token_ids[k]
        assert abs(entry["logprob"] - float(logp[k, entry["token"]])) < 1e-4
        best = logp[k].topk(3)
        assert [t["token"] for t in entry["top"]] == best.indices.tolist()
        assert all(abs(t["logprob"] - v) < 1e-4 for t, v in zip(entry["top"], best.values.tolist()))
    assert abs(result.logprob - sum(e["logprob"] for e in result.token_logprobs)) < 1e-6


def test_an_answer_that_runs_out_of_tokens_is_an_error_not_broken_json(any_engine):
    request = _request(any_engine, 1, "Describe.", SamplingParams(max_new_tokens=3, constraint=ZOO[0]))
    result = any_engine.generate([request])[0]
    assert result.error == "generate: the answer did not complete the schema within 3 tokens"
    assert result.response is None


@pytest.mark.parametrize("constraint, reason", [
    (Constraint("regex", "[a-"), "unclosed character class"),
    (Constraint("grammar", "start: foo"), "foo"),
    (Constraint.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}), "nonsense"),
])
def test_a_constraint_that_does_not_compile_says_why(engine, constraint, reason):
    with pytest.raises(ConstraintError, match=reason):
        engine.grammars.grammar(constraint)
    result = engine.generate([_request(engine, 0, "Q?", SamplingParams(constraint=constraint))])[0]
    assert result.error.startswith("prompt: the ") and reason in result.error


def test_compiled_grammars_are_cached(engine):
    schema = Constraint.json_schema({"type": "object", "properties": {f"f{i}": {"type": "integer"} for i in range(10)}})
    before = engine.grammars.stats()
    first = engine.grammars.grammar(schema)
    assert engine.grammars.grammar(schema) is first
    after = engine.grammars.stats()
    assert after["constraint_compiles"] - before["constraint_compiles"] == 1
    assert after["constraint_cache_hits"] - before["constraint_cache_hits"] == 1


def test_a_steps_masks_are_each_matchers_own_allowed_tokens(engine):
    """All rows' masks from one call, unpacked: row r allows token t exactly when matcher r would
    take t next (rows in different states); a width that is not a multiple of 32 is cut, not shifted."""
    from actors.constraints import allowed

    grammars = engine.grammars
    matchers = [grammars.matcher(c) for c in ZOO] + [grammars.matcher(ZOO[0])]
    for token in engine.tokenizer('{"colour":"re', add_special_tokens=False)["input_ids"]:
        assert matchers[-1].consume_token(token)
    mask = allowed(matchers, grammars.vocab, torch.device("cpu"))
    assert mask.shape == (len(matchers), grammars.vocab)
    for row, matcher in enumerate(matchers):
        expected = [matcher.validate_tokens([t]) == 1 for t in range(grammars.vocab)]
        assert mask[row].tolist() == expected, ZOO[row] if row < len(ZOO) else "mid-answer"
    assert all(0 < int(n) < grammars.vocab for n in mask.sum(dim=1))
    assert allowed(matchers, grammars.vocab - 13, torch.device("cpu")).equal(mask[:, :-13])


def test_a_cache_hit_is_a_fresh_matcher_not_the_one_another_answer_moved(engine):
    grammars = engine.grammars
    moved = grammars.matcher(ZOO[0])
    for token in engine.tokenizer('{"colour":"red"', add_special_tokens=False)["input_ids"]:
        assert moved.consume_token(token)
    again = grammars.matcher(ZOO[0])
    brace = engine.tokenizer("{", add_special_tokens=False)["input_ids"]
    assert again is not moved and again.validate_tokens(brace) == 1 and moved.validate_tokens(brace) == 0


def _settled(engine) -> dict:
    """The counters once the loop has published the step that ended the last request."""
    for _ in range(400):
        stats = engine.stats()
        if not stats["running"] and not stats["waiting"]:
            return stats
        time.sleep(0.005)
    raise AssertionError(f"the loop still reports running requests: {stats}")


def test_the_loop_counts_what_constraints_cost(engine):
    """Mask and step clocks move with a constrained step; only the steps' own clocks with a free one."""
    before = _settled(engine)
    results = engine.generate([_request(engine, k, "Describe.", SamplingParams(max_new_tokens=120, constraint=ZOO[0]))
                               for k in range(3)])
    after = _settled(engine)
    grew = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
    assert grew["masked_rows"] == sum(r.num_output_tokens for r in results) == grew["generated_tokens"]
    assert grew["mask_compute_s"] > 0 and grew["step_s"] > grew["mask_compute_s"]
    assert grew["decode_only_steps"] > 0 and grew["decode_only_rows"] >= grew["decode_only_steps"]
    assert grew["constraint_cache_hits"] >= 2
    engine.generate([_request(engine, 0, "Describe.", SamplingParams(max_new_tokens=5))])
    free = _settled(engine)
    assert free["masked_rows"] == after["masked_rows"] and free["step_s"] > after["step_s"]


def test_choice_probabilities_of_requests_stepped_together_equal_each_alone(engine):
    """Greedy choice answers end in the step their first token comes; each ending moves the last
    running request into its slot, so the others' choices must be scored from where their KV is."""
    params = SamplingParams(max_new_tokens=8, constraint=Constraint.choices(CHOICES), choice_probs=True)
    requests = [_request(engine, k % 9, f"Which shape is it? ({k})", params) for k in range(16)]
    together = engine.generate(requests)
    for request, got in zip(requests, together):
        alone = engine.generate([request])[0]
        assert got.response == alone.response
        assert got.choice_probs == pytest.approx(alone.choice_probs, abs=1e-6)


@pytest.mark.parametrize("new", [1, 8])
def test_single_token_choices_are_scored_and_answered(any_engine, new):
    """A one-token choice completes its grammar with its first token (and `max_new_tokens=1` ends it
    by length): the choices are scored all the same, from the step that made that token."""
    options = ["a", "b", "c"]
    assert all(len(any_engine.tokenizer(o, add_special_tokens=False)["input_ids"]) == 1 for o in options)
    params = SamplingParams(max_new_tokens=new, constraint=Constraint.choices(options), choice_probs=True)
    requests = [_request(any_engine, k % 9, f"Which letter? ({k})", params) for k in range(6)]
    for result in any_engine.generate(requests):
        assert result.error is None and result.finish_reason == "stop", result.error
        assert result.response == max(result.choice_probs, key=result.choice_probs.get)
        assert sum(result.choice_probs.values()) == pytest.approx(1.0, abs=1e-9)
