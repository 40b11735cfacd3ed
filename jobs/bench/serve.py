"""Suite `serve`: the HTTP endpoint under 1, 4 and 16 concurrent streaming clients, against the
same engine called directly in this process on the same requests.

Clients are threads posting OpenAI chat requests (an inline JPEG, a 64-token answer, greedy,
`stream: true`) to a local Serve application on the tiny checkpoint, reading the server-sent
events as they come. Per level: time to first token (TTFT) p50/p99, whole-request latency,
tokens per second per client, requests per second. The direct baseline submits the same requests
to an `Engine` in this process (prepare the image, generate), at 1 and at 16 in flight; the
endpoint's overhead is its 1-client p50 latency minus the direct 1-in-flight p50. The full run
also puts 16 clients on a replica that prepares images in threads instead of its process pool,
with these images and with 1920x1080 ones.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from actors.engine import Engine
from jobs.bench import serve_replicas
from jobs.bench.common import (
    Plot,
    SuiteResult,
    Table,
    Target,
    local_ray,
    median,
    percentile,
    stream_events,
)
from jobs.bench.images import photo_jpeg
from jobs.make_tiny_model import make_tiny_model
from pipeline.config import EngineConfig, SamplingParams
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest

log = logging.getLogger(__name__)

LEVELS = (1, 4, 16)
IMAGE_SIZE = (320, 240)
BIG_IMAGE_SIZE = (1920, 1080)  # preparation pool vs threads is also compared on these
QUESTION = "What is shown in this image?"
DISTINCT_IMAGES = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_body(image: bytes, max_tokens: int, stream: bool) -> bytes:
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}
    body = {"messages": [message], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def stream_once(url: str, body: bytes) -> dict[str, float]:
    """One streamed request: seconds to the first text, seconds in all, completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    for event in stream_events(url, body):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return {"ttft_s": first if first is not None else total, "total_s": total, "tokens": tokens}


def load(base: str, bodies: list[bytes], clients: int, per_client: int) -> dict[str, float]:
    """Each client thread sends `per_client` streamed requests back to back."""
    url = f"{base}/v1/chat/completions"
    barrier = threading.Barrier(clients)

    def client(k: int) -> list[dict[str, float]]:
        barrier.wait()
        return [stream_once(url, bodies[(k * per_client + i) % len(bodies)]) for i in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for one in pool.map(client, range(clients)) for r in one]
    wall = time.perf_counter() - start
    ttft = [r["ttft_s"] * 1000 for r in done]
    total = [r["total_s"] * 1000 for r in done]
    return {
        "clients": clients, "requests": len(done), "wall_s": wall, "rps": len(done) / wall,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "p50_ms": percentile(total, 50), "p99_ms": percentile(total, 99),
        "tokens_per_s_per_client": median([r["tokens"] / r["total_s"] for r in done]),
    }


def direct(model: str, images: list[bytes], max_tokens: int, in_flight: int, requests: int) -> dict[str, float]:
    """The replica's work in this process, `in_flight` requests at a time: prepare, then generate."""
    engine = Engine(EngineConfig(model=model, max_new_tokens=max_tokens, device="cpu", page_size=16))
    prompt = engine.format_question(QUESTION, 1)

    def one(k: int) -> float:
        start = time.perf_counter()
        p = prepare(images[k % len(images)], engine.spec)
        engine.generate([GenerationRequest(prompt, [p.tiles], [p.size], SamplingParams(max_new_tokens=max_tokens),
                                           [p.digest])])
        return time.perf_counter() - start

    try:
        one(0)
        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            latencies = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    finally:
        engine.close()
    return {"in_flight": in_flight, "requests": requests, "rps": requests / wall,
            "p50_ms": 1000 * median(latencies), "p99_ms": 1000 * percentile(latencies, 99)}


def replica_ratios(runs: dict[str, dict]) -> dict[str, float]:
    """Two replicas over one, and image-aware routing over Serve's default choice."""
    routed, default = runs["2 replicas, image-aware"], runs["2 replicas, default"]

    def share(run: dict, part: str, whole: str) -> float:
        return run[part] / max(1, run[whole])

    ratios = {
        "ratio_encodings_run_per_requested_routed_over_default":
            share(routed, "encodings_run", "encodings_requested") / share(default, "encodings_run", "encodings_requested"),
        "ratio_prefill_computed_per_submitted_routed_over_default":
            share(routed, "prefill_computed", "prefill_submitted") / share(default, "prefill_computed", "prefill_submitted"),
        "speedup_rps_routed_over_default_2_replicas": routed["rps"] / default["rps"],
    }
    if "1 replica" in runs:
        ratios["speedup_rps_2_replicas_over_1"] = routed["rps"] / runs["1 replica"]["rps"]
        ratios["ratio_ttft_p50_2_replicas_over_1"] = routed["ttft_p50_ms"] / runs["1 replica"]["ttft_p50_ms"]
    return ratios


def replica_table(replicas: dict) -> Table:
    rows = [[name, r["clients"], r["requests"], r["rps"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["p50_ms"],
             f"{r['encodings_run']} / {r['encodings_requested']}", f"{r['prefill_computed']} / {r['prefill_submitted']}",
             " ".join(str(x["requests"]) for x in r["replicas"])]
            for name, r in replicas["runs"].items()]
    header = ["engine replicas, routing", "clients", "requests", "requests/s", "TTFT p50 ms", "TTFT p99 ms", "p50 ms",
              "image encodings run / requested", "prompt tokens prefilled / submitted", "requests per replica"]
    title = (f"Replicas on a {replicas['nodes']}-node local cluster: {replicas['clients']} clients, conversations of "
             f"{replicas['turns']} turns about one image each")
    return Table(title, header, rows)


def run(quick: bool) -> SuiteResult:
    from ray import serve

    from actors.serve_app import build_app

    per_client, max_tokens = (1, 16) if quick else (4, 64)
    images = [photo_jpeg(*IMAGE_SIZE, seed=k) for k in range(DISTINCT_IMAGES)]
    bodies = [chat_body(image, max_tokens, stream=True) for image in images]
    threads = torch.get_num_threads()
    # Logical CPUs for the replica (engine + one preparation process) beside the client threads.
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, local_ray(num_cpus=4):
        model = str(make_tiny_model(Path(tmp) / "model"))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            args = {"model": model, "max_new_tokens": max_tokens, "gpus_per_replica": 0, "dtype": "float32",
                    "page_size": 16, "max_ongoing_requests": 2 * max(LEVELS), "max_queued_requests": 4 * max(LEVELS)}
            serve.run(build_app(args), name="bench", route_prefix="/")
            base = f"http://127.0.0.1:{port}"
            load(base, bodies, 4, 1)  # warm-up: the replica's pool, the image cache, the loop
            levels = {c: load(base, bodies, c, per_client * (1 if c == 1 else 2)) for c in LEVELS}
            big: dict[str, dict[str, float]] = {}
            if quick:  # the smoke run skips the comparison with preparation in threads
                threads_16 = levels[16]
            else:
                serve.run(build_app({**args, "prepare_workers": 0}), name="threads", route_prefix="/threads")
                load(f"{base}/threads", bodies, 4, 1)
                threads_16 = load(f"{base}/threads", bodies, 16, per_client * 2)
                big_bodies = [chat_body(photo_jpeg(*BIG_IMAGE_SIZE, seed=k), max_tokens, stream=True)
                              for k in range(DISTINCT_IMAGES)]
                for name, prefix in (("pool", ""), ("threads", "/threads")):
                    load(f"{base}{prefix}", big_bodies, 4, 1)
                    big[name] = load(f"{base}{prefix}", big_bodies, 16, 2)
        finally:
            serve.shutdown()
        torch.set_num_threads(1)  # as in a replica holding one CPU
        try:
            one = direct(model, images, max_tokens, 1, 4 * per_client)
            sixteen = direct(model, images, max_tokens, 16, 32 * per_client if not quick else 16)
        finally:
            torch.set_num_threads(threads)
    replicas = serve_replicas.run_apart(quick)
    overhead_ms = levels[1]["p50_ms"] - one["p50_ms"]
    ratios = {
        "ratio_endpoint_rps_over_direct_at_16": levels[16]["rps"] / sixteen["rps"],
        "ratio_ttft_p50_16_over_1_client": levels[16]["ttft_p50_ms"] / levels[1]["ttft_p50_ms"],
        "speedup_rps_16_over_1_client": levels[16]["rps"] / levels[1]["rps"],
        "ratio_endpoint_p50_over_direct": levels[1]["p50_ms"] / one["p50_ms"],
        "speedup_rps_process_pool_over_threads_at_16": levels[16]["rps"] / threads_16["rps"],
    }
    ratios.update(replica_ratios(replicas["runs"]))
    if big:
        ratios["speedup_rps_process_pool_over_threads_at_16_big"] = big["pool"]["rps"] / big["threads"]["rps"]
        ratios["ratio_ttft_p50_process_pool_over_threads_at_16_big"] = (
            big["pool"]["ttft_p50_ms"] / big["threads"]["ttft_p50_ms"])
    rows = [["endpoint (stream)", c, lvl["requests"], lvl["rps"], lvl["ttft_p50_ms"], lvl["ttft_p99_ms"], lvl["p50_ms"],
             lvl["p99_ms"], lvl["tokens_per_s_per_client"]] for c, lvl in levels.items()]
    rows += [["direct engine call", d["in_flight"], d["requests"], d["rps"], "-", "-", d["p50_ms"], d["p99_ms"], "-"]
             for d in (one, sixteen)]
    rows.append(["endpoint, preparation in threads", 16, threads_16["requests"], threads_16["rps"],
                 threads_16["ttft_p50_ms"], threads_16["ttft_p99_ms"], threads_16["p50_ms"], threads_16["p99_ms"],
                 threads_16["tokens_per_s_per_client"]])
    for name, lvl in big.items():
        rows.append([f"endpoint, {BIG_IMAGE_SIZE[0]}x{BIG_IMAGE_SIZE[1]} images, preparation in "
                     + ("processes" if name == "pool" else "threads"), 16, lvl["requests"], lvl["rps"],
                     lvl["ttft_p50_ms"], lvl["ttft_p99_ms"], lvl["p50_ms"], lvl["p99_ms"], lvl["tokens_per_s_per_client"]])
    header = ["path", "clients / in flight", "requests", "requests/s", "TTFT p50 ms", "TTFT p99 ms", "p50 ms",
              "p99 ms", "tokens/s per client"]
    title = "Online endpoint: streamed requests by concurrent clients vs the engine called directly (tiny checkpoint, CPU)"
    return SuiteResult(
        "serve", title, header, rows, ratios,
        targets=[
            Target("endpoint requests/s at 16 clients / direct at 16 in flight", ratios["ratio_endpoint_rps_over_direct_at_16"], 0.7, True),
            Target("endpoint overhead over a direct engine call, p50 ms", overhead_ms, 15.0, False),
            Target("TTFT p50 at 16 clients / 1 client", ratios["ratio_ttft_p50_16_over_1_client"], 3.0, False),
        ],
        tables=[replica_table(replicas)],
        raw={"replicas": replicas, "levels": levels, "threads_16": threads_16, "big_images_16": big, "direct_1": one, "direct_16": sixteen, "overhead_p50_ms": overhead_ms,
             "max_tokens": max_tokens, "image_size": IMAGE_SIZE, "distinct_images": DISTINCT_IMAGES},
        notes=[
            f"Each request: one of {DISTINCT_IMAGES} {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs as a data URL, {max_tokens} "
            "new tokens, greedy, streamed; one replica (continuous scheduler, one preparation process); clients are "
            "threads of the benchmark process on the same machine, so they share its cores with the replica.",
            f"Overhead: 1-client p50 of the endpoint minus the direct call's p50 = {overhead_ms:.1f} ms.",
        ],
        plot=Plot(
            title="Time to first token by concurrent clients (lower is better)", ylabel="ms",
            categories=[f"{c} client{'s' if c > 1 else ''}" for c in LEVELS],
            series={"TTFT p50": [levels[c]["ttft_p50_ms"] for c in LEVELS],
                    "whole request p50": [levels[c]["p50_ms"] for c in LEVELS]},
        ),
    )
