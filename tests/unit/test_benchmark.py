"""Smoke test of `python -m jobs.benchmark`: every suite runs in --quick mode and writes its files.

A smoke run proves the suites work and their reports have the promised shape; the figures of a
quick run are not measurements and are not checked.
"""

from __future__ import annotations

import json

import pytest

from jobs import benchmark


def _run(suite: str, out) -> dict:
    assert benchmark.main([suite, "--out", str(out), "--quick"]) == 0
    for ext in ("json", "md", "png"):
        assert (out / f"{suite}.{ext}").stat().st_size > 0, ext
    report = json.loads((out / f"{suite}.json").read_text())
    assert report["env"]["cpu"] and report["env"]["cores"] >= 1 and report["env"]["libraries"]["torch"]
    assert (out / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


def _assert_ratios(report: dict) -> None:
    assert report["ratios"] and all(k.startswith(("speedup_", "ratio_")) for k in report["ratios"])
    assert all(v > 0 for v in report["ratios"].values())
    assert report["targets"] and all(isinstance(t["met"], bool) for t in report["targets"])


def test_preprocess_suite(tmp_path):
    report = _run("preprocess", tmp_path)
    _assert_ratios(report)
    assert report["raw"]["max_abs_diff_vs_transformers"] <= 1e-5
    assert "| 4000x3000 |" in (tmp_path / "preprocess.md").read_text()


def test_engine_suite(tmp_path):
    report = _run("engine", tmp_path)
    _assert_ratios(report)
    assert all(r["tokens_equal"] == r["rows"] for r in report["raw"]["results"])
    assert {r["workload"] for r in report["raw"]["results"]} == {"mixed", "questions"}
    _assert_constrained(report, (tmp_path / "engine.md").read_text())


def _assert_constrained(report: dict, md: str) -> None:
    """The constrained workload: 32 answers valid under the schema, free twins exactly as long,
    the loop's clocks behind every figure, the cache's counts and the compile times reported."""
    import jsonschema

    (run,) = report["raw"]["constrained"]  # --quick: the tiny checkpoint only
    schema = report["raw"]["schema"]
    assert len(schema["properties"]) == 10 and run["requests"] == 32 and not run["errors"]
    for answer in run["answers"]:
        jsonschema.validate(json.loads(answer), schema)
    constrained, free = run["constrained"], run["free"]
    assert constrained["tokens"] == free["tokens"] and run["free_tokens_equal"] == 32
    assert constrained["masked_rows"] == constrained["generated_tokens"] == sum(constrained["tokens"])
    assert free["masked_rows"] == 0 and free["mask_compute_s"] == 0
    assert constrained["decode_only_steps"] > 0 and 0 < run["mask_share_of_step"] < 1
    assert (run["compiles_first_run"], run["cache_hits_first_run"]) == (1, 31)
    assert 0 < run["compile_hit_s"] < run["compile_cold_s"] < 0.5
    assert report["ratios"]["ratio_constrained_over_free_decode_step_tiny"] == run["ratio_decode_step"]
    names = [t["name"] for t in report["targets"]]
    assert any(n.startswith("compile a 10-field schema, cold") for n in names)
    assert "#### Constrained: 32 running requests" in md and "| tiny | schema | 32 |" in md


@pytest.mark.parametrize("suite", ["pipeline", "serve"])
def test_ray_suites(suite, tmp_path, ray_local):
    report = _run(suite, tmp_path)
    _assert_ratios(report)
    assert ray_local.is_initialized()  # the suite used the session's Ray and left it running
    if suite == "serve":  # its multi-node part: image-aware routing encodes each conversation's image once
        replicas = report["raw"]["replicas"]
        routed = replicas["runs"]["2 replicas, image-aware"]
        assert routed["encodings_run"] == replicas["clients"] * replicas["conversations_per_client"]
        assert routed["requests"] == routed["encodings_requested"] == 4 * routed["encodings_run"]
        assert "#### Replicas on a 3-node local cluster" in (tmp_path / "serve.md").read_text()


def test_gpu_suite_runs_or_says_why_not(tmp_path):
    import torch

    report = _run("gpu", tmp_path)
    if torch.cuda.is_available():
        _assert_ratios(report)
    else:
        assert report["skipped"] and "CUDA" in report["skipped"] and report["ratios"] == {}


def test_peers_suite_without_a_peer_says_how_to_get_one(tmp_path):
    report = _run("peers", tmp_path)
    assert report["skipped"] and "--vllm-python" in report["skipped"] and report["ratios"] == {}


def test_the_peer_gets_the_hub_key_layout(tmp_path, tiny_model):
    """vLLM reads `vision_tower.vision_model.*`; transformers 5 saves `vision_tower.*` (same tensors)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from jobs.bench.peers import hub_layout

    ours = load_file(str(Path(tiny_model) / "model.safetensors"))
    theirs = load_file(str(hub_layout(Path(tiny_model), tmp_path / "hub") / "model.safetensors"))
    assert len(theirs) == len(ours) and any(k.startswith("vision_tower.vision_model.") for k in theirs)
    for key, tensor in ours.items():
        renamed = "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key
        assert theirs[renamed].equal(tensor)
