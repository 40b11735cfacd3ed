"""The engine suite's constrained workload: 32 running requests answering under a JSON schema,
against the same requests answering freely with exactly as many tokens.

A constrained step does three things a free one does not: it computes every constrained row's
allowed tokens (llguidance, on the CPU), masks the logits with them, and advances each row's
matcher by its token. What that costs is a share of a decoding step, so the figure is the time per
decoding step with the same rows in it, not the time per request: each free request's
`max_new_tokens` is its constrained twin's answer length, so both runs step the same batches, and
the loop's own clocks (`decode_only_steps`, `decode_only_step_s`, `mask_*_s` in its stats) time
the steps that only decode. Prefill and image encoding are the same in both runs and left out:
every prompt is prefilled once before the runs, so both find the same stored prefixes.

The schema is what an annotation job asks for: ten fields, with enums, integers with bounds,
booleans, bounded strings, an array of enums, an array of strings and a nested object.
Compiling it is timed apart, cold (a schema the cache has not seen) and on a cache hit.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time

from actors.engine import Engine
from jobs.bench.common import Plot, Table, Target
from jobs.bench.images import photo_jpeg
from pipeline.config import Constraint, EngineConfig, SamplingParams
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest

log = logging.getLogger(__name__)

RUNNING = 32
IMAGES = 4  # each asked every question: one image encoding and one stored prefix per image
MAX_NEW_TOKENS = 256
QUESTIONS = (
    "Describe this image as JSON.", "What is the main subject?", "Annotate the scene.", "List what you see.",
    "How many people are there?", "What are the main colours?", "Is it outdoors?", "Is there any text?",
)
SCHEMA = {
    "type": "object",
    "properties": {
        "subject": {"type": "string", "maxLength": 24},
        "kind": {"enum": ["photo", "drawing", "diagram", "screenshot", "scan"]},
        "people": {"type": "integer", "minimum": 0, "maximum": 99},
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow", "black", "white"]},
                    "maxItems": 3},
        "outdoor": {"type": "boolean"},
        "lighting": {"enum": ["day", "night", "indoor"]},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "size": {"type": "object", "properties": {"width": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                 "height": {"type": "integer", "minimum": 1, "maximum": 9999}},
                 "required": ["width", "height"], "additionalProperties": False},
        "text_present": {"type": "boolean"},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["subject", "kind", "people", "colours", "outdoor", "lighting", "objects", "size", "text_present",
                 "confidence"],
    "additionalProperties": False,
}
WARM_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
CLOCKS = ("generated_tokens", "steps", "step_s", "decode_only_steps", "decode_only_rows", "decode_only_step_s",
          "masked_rows", "mask_compute_s", "mask_apply_s", "matcher_advance_s", "constraint_compiles",
          "constraint_cache_hits")


def renamed(schema: dict, suffix: str) -> dict:
    """The schema with every top-level field renamed: the same work to compile, a new cache key."""
    out = copy.deepcopy(schema)
    out["properties"] = {f"{k}_{suffix}": v for k, v in schema["properties"].items()}
    out["required"] = [f"{k}_{suffix}" for k in schema["required"]]
    return out


def compile_times(engine: Engine, cold_trials: int, hit_trials: int = 200) -> dict[str, float]:
    """Seconds a request waits for its matcher under the schema: the median cold compile (a schema
    the cache has not seen: grammar, checks, first matcher), and the median cache hit (a copy of
    the cached matcher)."""
    grammars = engine.grammars
    cold = []
    for trial in range(cold_trials):
        constraint = Constraint.json_schema(renamed(SCHEMA, f"c{trial}"))
        start = time.perf_counter()
        grammars.matcher(constraint)
        cold.append(time.perf_counter() - start)
    hits = []
    for _ in range(hit_trials):
        start = time.perf_counter()
        grammars.matcher(constraint)
        hits.append(time.perf_counter() - start)
    return {"compile_cold_s": statistics.median(cold), "compile_hit_s": statistics.median(hits)}


def _prompts(engine: Engine) -> list[tuple]:
    photos = [prepare(photo_jpeg(320 + 32 * i, 240 + 24 * (i % 3), seed=500 + i), engine.spec) for i in range(IMAGES)]
    return [(photos[k // len(QUESTIONS) % IMAGES], QUESTIONS[k % len(QUESTIONS)]) for k in range(RUNNING)]


def _rows(engine: Engine, prompts: list[tuple], params: list[SamplingParams]) -> list[GenerationRequest]:
    return [GenerationRequest(engine.format_question(q, 1), [p.tiles], [p.size], sp, [p.digest])
            for (p, q), sp in zip(prompts, params)]


def settled(engine: Engine, timeout_s: float = 10.0) -> dict:
    """The loop's counters once it has published the step that ended the last request (a result
    resolves during its step; the counters are published after it)."""
    deadline = time.monotonic() + timeout_s
    while (stats := engine.stats())["running"] or stats["waiting"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the loop still reports running requests: {stats}")
        time.sleep(0.005)
    return stats


def _run(engine: Engine, rows: list[GenerationRequest]) -> dict:
    """One run of the rows at once: its results and what the loop's clocks and counters moved by."""
    before = settled(engine)
    results = engine.generate(rows)
    after = settled(engine)
    run = {k: after[k] - before[k] for k in CLOCKS}
    run["results"] = results
    run["tokens"] = [r.num_output_tokens for r in results]
    run["errors"] = [r.error for r in results if r.error]
    run["decode_step_ms"] = 1000 * run["decode_only_step_s"] / max(1, run["decode_only_steps"])
    run["rows_per_decode_step"] = run["decode_only_rows"] / max(1, run["decode_only_steps"])
    run["ms_per_token"] = 1000 * run["step_s"] / max(1, run["generated_tokens"])
    run["mask_s"] = run["mask_compute_s"] + run["mask_apply_s"] + run["matcher_advance_s"]
    return run


def measure(model: str, label: str, repeats: int, cold_trials: int) -> dict:
    """Constrained and free runs of the same 32 requests, alternating `repeats` times (the fastest
    of each kind is reported, the first constrained run's cache counts), and the compile times."""
    engine = Engine(EngineConfig(model=model, device="cpu", page_size=16, max_running_requests=RUNNING))
    try:
        prompts = _prompts(engine)
        schema = Constraint.json_schema(SCHEMA)
        warm = [SamplingParams(max_new_tokens=1)] * (RUNNING - 1) + [
            SamplingParams(max_new_tokens=32, constraint=Constraint.json_schema(WARM_SCHEMA))]
        engine.generate(_rows(engine, prompts, warm))  # images encoded, prefixes stored, the grammars built
        constrained, free = [], []
        for _ in range(repeats):
            constrained.append(_run(engine, _rows(engine, prompts, [
                SamplingParams(max_new_tokens=MAX_NEW_TOKENS, constraint=schema)] * RUNNING)))
            lengths = constrained[-1]["tokens"]
            free.append(_run(engine, _rows(engine, prompts, [SamplingParams(max_new_tokens=max(1, n))
                                                               for n in lengths])))
        compiled = compile_times(engine, cold_trials)
    finally:
        engine.close()
    best_c = min(constrained, key=lambda r: r["decode_step_ms"])
    best_f = min(free, key=lambda r: r["decode_step_ms"])
    first = constrained[0]
    answers = [r.response for r in first["results"]]
    valid_json = sum(_is_json_object(a) for a in answers)
    out = {
        "checkpoint": label, "requests": RUNNING, "repeats": repeats,
        "constrained": _public(best_c), "free": _public(best_f),
        "ratio_decode_step": best_c["decode_step_ms"] / best_f["decode_step_ms"],
        "ratio_per_token": best_c["ms_per_token"] / best_f["ms_per_token"],
        "mask_share_of_step": best_c["mask_s"] / best_c["step_s"],
        "compiles_first_run": first["constraint_compiles"], "cache_hits_first_run": first["constraint_cache_hits"],
        "answers": answers, "valid_json": valid_json, "errors": first["errors"],
        "free_tokens_equal": sum(a == b for a, b in zip(best_c["tokens"], best_f["tokens"])),
        **compiled,
    }
    log.info("%s constrained: %.2f ms per decoding step vs %.2f free (x%.3f), masks %.1f%% of step time, "
             "compile %.1f ms cold, %.1f us on a hit", label, best_c["decode_step_ms"], best_f["decode_step_ms"],
             out["ratio_decode_step"], 100 * out["mask_share_of_step"], 1000 * compiled["compile_cold_s"],
             1e6 * compiled["compile_hit_s"])
    return out


def _is_json_object(text: str | None) -> bool:
    try:
        return isinstance(json.loads(text or ""), dict)
    except ValueError:
        return False


def _public(run: dict) -> dict:
    """A run's figures for the report (its results are summarised elsewhere)."""
    return {k: v for k, v in run.items() if k != "results"}


# ---- the report ---------------------------------------------------------------------------------

STEP_BOUND = 1.10  # constrained / free time per decoding step, bench-size checkpoint
COMPILE_COLD_BOUND_S = 0.5
COMPILE_HIT_BOUND_S = 1e-4  # "no time": a hit copies the cached matcher


def _key(run: dict) -> str:
    return run["checkpoint"].replace("-", "_")


def ratios(runs: list[dict]) -> dict[str, float]:
    out = {}
    for r in runs:
        out[f"ratio_constrained_over_free_decode_step_{_key(r)}"] = r["ratio_decode_step"]
        out[f"ratio_constrained_over_free_per_token_{_key(r)}"] = r["ratio_per_token"]
        out[f"ratio_mask_share_of_step_{_key(r)}"] = r["mask_share_of_step"]
    return out


def targets(runs: list[dict]) -> list[Target]:
    out = [Target(f"constrained / free time per decoding step, {RUNNING} running, {r['checkpoint']}",
                  r["ratio_decode_step"], STEP_BOUND, False) for r in runs if r["checkpoint"] == "bench-size"]
    for r in runs[-1:]:  # both checkpoints share one tokenizer: one compile figure
        out.append(Target(f"compile a 10-field schema, cold (s), {r['checkpoint']}", r["compile_cold_s"],
                          COMPILE_COLD_BOUND_S, False))
        out.append(Target(f"compile a 10-field schema, cache hit (s), {r['checkpoint']}", r["compile_hit_s"],
                          COMPILE_HIT_BOUND_S, False))
    return out


def tables(runs: list[dict]) -> list[Table]:
    if not runs:
        return []
    rows = []
    for r in runs:
        for kind in ("constrained", "free"):
            run = r[kind]
            per_step = 1000 * run["mask_s"] / max(1, run["steps"])
            rows.append([
                r["checkpoint"], "schema" if kind == "constrained" else "free", len(run["tokens"]),
                sum(run["tokens"]), run["decode_only_steps"], run["rows_per_decode_step"], run["decode_step_ms"],
                run["ms_per_token"], per_step if kind == "constrained" else 0.0,
                r["mask_share_of_step"] if kind == "constrained" else 0.0,
                f"{r['valid_json']}/{r['requests']}" if kind == "constrained" else "-",
                f"{r['compiles_first_run']} / {r['cache_hits_first_run']}" if kind == "constrained" else "-",
            ])
    compile_rows = [[r["checkpoint"], 1000 * r["compile_cold_s"], 1e6 * r["compile_hit_s"]] for r in runs]
    return [
        Table(f"Constrained: {RUNNING} running requests under a 10-field JSON schema vs the same requests free",
              ["checkpoint", "run", "requests", "tokens", "decode-only steps", "rows per decode step",
               "ms per decode step", "ms per token (all steps)", "mask ms per step", "mask share of step",
               "valid JSON", "compiles / cache hits"], rows),
        Table("Compiling the 10-field schema (what a request waits for its matcher)",
              ["checkpoint", "cold, ms (median)", "cache hit, us (median)"], compile_rows),
    ]


def notes(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    equal = ", ".join(f"{r['free_tokens_equal']}/{r['requests']} ({r['checkpoint']})" for r in runs)
    return [
        f"constrained: {RUNNING} requests ({len(QUESTIONS)} questions on each of {IMAGES} images) at once with "
        f"`max_running_requests={RUNNING}`, greedy, under a 10-field JSON schema (enums, bounded integers, "
        "booleans, bounded strings, two arrays, a nested object); then the same requests free, each with "
        "`max_new_tokens` equal to its constrained twin's answer length, so both runs step the same batches "
        f"(free answers as long as their twins: {equal}). "
        "The ratio is the time per step that only decodes (the loop's `decode_only_step_s` over "
        "`decode_only_steps`), fastest of "
        f"{runs[0]['repeats']} alternating runs of each; every prompt was prefilled once before, so prefill and "
        "image encoding are the same in both and left out.",
        "mask share: the loop's `mask_compute_s + mask_apply_s + matcher_advance_s` over its `step_s` in the "
        "constrained run: the masks are computed after the step's forward, so they add to it (on a GPU too). "
        "The checkpoints' vocabulary is 512 tokens; a mask's cost grows with the vocabulary (llguidance walks "
        "a token trie), so a 32k-token checkpoint pays more per row.",
        "compile: `Grammars.matcher` on a schema the cache has not seen (the grammar, its checks and the first "
        "matcher) and on one it has (a copy of the cached matcher); compiles / cache hits count the first "
        "constrained run (one compile, then hits).",
    ]


def plot(runs: list[dict]) -> Plot:
    return Plot(
        title=f"ms per decoding step, {RUNNING} running (lower is better)", ylabel="ms",
        categories=[r["checkpoint"] for r in runs],
        series={"free": [r["free"]["decode_step_ms"] for r in runs],
                "JSON schema": [r["constrained"]["decode_step_ms"] for r in runs]},
    )
