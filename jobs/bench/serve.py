"""Suite `serve`: the HTTP endpoint under 1, 4 and 16 concurrent clients, and its cost per request.

Clients are threads posting OpenAI chat requests with an inline JPEG to a local Serve
application on the tiny checkpoint. Throughput at 16 clients over 1 client is what dynamic
batching buys; the overhead is the 1-client p50 latency minus that of the same work (prepare the
image, one `Engine.generate`) called directly in this process. The overhead is measured on a
second application whose batcher does not wait, because a lone request otherwise waits the
configured `batch_wait_ms` for company by design.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from actors.engine import Engine
from jobs.bench.common import Plot, SuiteResult, Target, local_ray, median, percentile, seconds
from jobs.bench.images import photo_jpeg
from jobs.make_tiny_model import make_tiny_model
from pipeline.config import EngineConfig
from pipeline.preprocess import prepare
from pipeline.schemas import GenerationRequest

log = logging.getLogger(__name__)

LEVELS = (1, 4, 16)
IMAGE_SIZE = (320, 240)
QUESTION = "What is shown in this image?"
MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 20.0  # as in actors/serve_config.yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_body(image: bytes, max_tokens: int) -> bytes:
    url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}
    return json.dumps({"messages": [message], "max_tokens": max_tokens, "temperature": 0}).encode()


def post(url: str, body: bytes) -> float:
    """Seconds for one chat request; anything but a 200 stops the suite (a failed request is not a fast one)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return time.perf_counter() - start


def load(base: str, body: bytes, clients: int, per_client: int) -> dict[str, float]:
    """Requests/s and latency percentiles with `clients` threads each sending back-to-back requests."""
    url = f"{base}/v1/chat/completions"
    barrier = threading.Barrier(clients)

    def client(_: int) -> list[float]:
        barrier.wait()
        return [post(url, body) for _ in range(per_client)]

    before = json.loads(urllib.request.urlopen(f"{base}/v1/stats", timeout=30).read())
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [s for one in pool.map(client, range(clients)) for s in one]
    wall = time.perf_counter() - start
    after = json.loads(urllib.request.urlopen(f"{base}/v1/stats", timeout=30).read())
    batches = after["batches"] - before["batches"]
    return {
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_batch_size": (after["requests"] - before["requests"]) / batches if batches else 0.0,
    }


def direct_ms(model: str, image: bytes, max_tokens: int, repeats: int, batch: int = 1) -> list[float]:
    """Milliseconds of the replica's own work done in-process: prepare `batch` images, generate once.

    One torch thread, as in a Serve replica holding one CPU. With `batch` > 1 it is the ceiling of
    what dynamic batching can gain on this device, with no HTTP in the way.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine(EngineConfig(model=model, max_new_tokens=max_tokens, device="cpu"))
        prompt = engine.format_question(QUESTION, 1)

        def once() -> None:
            prepared = [prepare(image, engine.spec) for _ in range(batch)]
            engine.generate([GenerationRequest(prompt, [p.tiles], [p.size]) for p in prepared])

        once()
        return [1000 * seconds(once) for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)


def deploy(model: str, name: str, max_tokens: int, batch_wait_ms: float) -> None:
    from ray import serve

    from actors.serve_app import build_app

    args = {
        "model": model, "max_new_tokens": max_tokens, "gpus_per_replica": 0, "dtype": "float32",
        "max_batch_size": MAX_BATCH_SIZE, "batch_wait_ms": batch_wait_ms,
        "max_ongoing_requests": 2 * max(LEVELS), "max_queued_requests": 4 * max(LEVELS),
    }
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")


def run(quick: bool) -> SuiteResult:
    from ray import serve

    per_client, max_tokens, repeats = (2, 8, 8) if quick else (8, 16, 40)
    image = photo_jpeg(*IMAGE_SIZE, seed=7)
    body = chat_body(image, max_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, local_ray():
        model = str(make_tiny_model(Path(tmp) / "model"))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            deploy(model, "batched", max_tokens, BATCH_WAIT_MS)
            deploy(model, "nowait", max_tokens, 0.0)
            base = f"http://127.0.0.1:{port}"
            for name in ("batched", "nowait"):
                load(f"{base}/{name}", body, 4, 1)  # warm both replicas up
            levels = [load(f"{base}/batched", body, c, per_client * (1 if c == 1 else 2)) for c in LEVELS]
            nowait = load(f"{base}/nowait", body, 1, 2 * per_client)
            direct_by_batch = {c: direct_ms(model, image, max_tokens, max(2, repeats // c), c) for c in LEVELS}
        finally:
            serve.shutdown()
    by_clients = {lvl["clients"]: lvl for lvl in levels}
    direct = direct_by_batch[1]
    direct_p50 = median(direct)
    direct_rps = {c: c * 1000 / median(ms) for c, ms in direct_by_batch.items()}
    ratios = {
        "speedup_direct_batch_16_over_1": direct_rps[16] / direct_rps[1],
        "speedup_rps_16_over_1_client": by_clients[16]["rps"] / by_clients[1]["rps"],
        "speedup_rps_4_over_1_client": by_clients[4]["rps"] / by_clients[1]["rps"],
        "ratio_endpoint_p50_over_direct": nowait["p50_ms"] / direct_p50,
        "ratio_endpoint_p50_with_batch_wait_over_direct": by_clients[1]["p50_ms"] / direct_p50,
    }
    overhead_ms = nowait["p50_ms"] - direct_p50
    rows = [
        [f"endpoint, wait {BATCH_WAIT_MS:g} ms", lvl["clients"], lvl["requests"], lvl["rps"], lvl["p50_ms"], lvl["p99_ms"], lvl["mean_batch_size"]]
        for lvl in levels
    ]
    rows.append(["endpoint, wait 0 ms", 1, nowait["requests"], nowait["rps"], nowait["p50_ms"], nowait["p99_ms"], nowait["mean_batch_size"]])
    rows += [
        ["direct Engine call", c, c * len(ms), direct_rps[c], median(ms), percentile(ms, 99), float(c)]
        for c, ms in direct_by_batch.items()
    ]
    return SuiteResult(
        suite="serve",
        title="Online endpoint: requests/s and latency by concurrent clients (tiny checkpoint, CPU)",
        header=["path", "clients", "requests", "requests/s", "p50 ms", "p99 ms", "mean batch"],
        rows=rows,
        ratios=ratios,
        targets=[
            Target("requests/s at 16 clients / 1 client", ratios["speedup_rps_16_over_1_client"], 3.0, True),
            Target("endpoint overhead over a direct engine call, p50 ms", overhead_ms, 15.0, False),
        ],
        raw={
            "levels": levels, "nowait": nowait, "direct_ms_by_batch": direct_by_batch, "overhead_p50_ms": overhead_ms,
            "overhead_p50_ms_with_batch_wait": by_clients[1]["p50_ms"] - direct_p50,
            "max_tokens": max_tokens, "image_size": IMAGE_SIZE, "max_batch_size": MAX_BATCH_SIZE,
            "batch_wait_ms": BATCH_WAIT_MS,
        },
        notes=[
            f"Each request: one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG as a data URL, {max_tokens} new tokens, greedy; "
            f"one replica on one CPU, max_batch_size {MAX_BATCH_SIZE}; clients are threads of the benchmark process "
            "on the same machine.",
            f"Overhead: 1-client p50 of the no-wait application minus the direct call's p50 = {overhead_ms:.1f} ms "
            f"({by_clients[1]['p50_ms'] - direct_p50:.1f} ms with the {BATCH_WAIT_MS:g} ms batch wait).",
        ],
        plot=Plot(
            title="Requests per second by concurrent clients (higher is better)", ylabel="requests/s",
            categories=[f"{c} client{'s' if c > 1 else ''}" for c in LEVELS],
            series={
                f"endpoint (batch wait {BATCH_WAIT_MS:g} ms)": [by_clients[c]["rps"] for c in LEVELS],
                "direct Engine call, batch = clients": [direct_rps[c] for c in LEVELS],
            },
        ),
    )
