"""Part of suite `serve`: one vs two engine replicas on a local multi-node Ray cluster, and
image-aware routing vs Serve's default choice, under 16 clients holding 4-turn conversations.

Runs as its own process (`python -m jobs.bench.serve_replicas OUT.json [--quick]`), because the
cluster it builds (`ray.cluster_utils.Cluster`: a head and two worker nodes on loopback) needs a
driver of its own, and the suite may run inside a process already attached to another Ray.
Each client holds conversations one after another; a conversation is about one image, which
every turn resends with the whole history, as OpenAI clients do. Per run: requests/s, time to
first token, and from the replicas' own counters the image encodings run / requested and the
prompt tokens prefilled / submitted.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs.bench.common import stream_events

log = logging.getLogger(__name__)

TURNS = 4
NODES = 2  # worker nodes, one engine replica each at most (each has room for one)
QUESTIONS = ("What is shown in this image?", "What colour is it?", "Where is it in the picture?", "Anything else?")


def data_url(seed: int) -> str:
    from jobs.bench.images import photo_jpeg

    return "data:image/jpeg;base64," + base64.b64encode(photo_jpeg(320, 240, seed=seed)).decode()


def turn(url: str, messages: list[dict], max_tokens: int) -> tuple[str, float, float]:
    """One streamed turn: (answer, seconds to the first text, seconds in all)."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    start, first, pieces = time.perf_counter(), None, []
    for event in stream_events(url, body):
        text = event["choices"][0]["delta"].get("content") if event["choices"] else None
        if text:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(text)
    total = time.perf_counter() - start
    return "".join(pieces), first if first is not None else total, total


def conversations(base: str, clients: int, per_client: int, max_tokens: int, seed: int) -> dict[str, float]:
    """`clients` threads, each holding `per_client` conversations of TURNS turns in a row."""
    from jobs.bench.common import percentile

    url = f"{base}/v1/chat/completions"
    barrier = threading.Barrier(clients)

    def client(k: int) -> list[tuple[float, float]]:
        barrier.wait()
        done = []
        for c in range(per_client):
            image = data_url(seed + k * per_client + c)
            messages: list[dict] = []
            for t in range(TURNS):
                content: list[dict] = [{"type": "text", "text": QUESTIONS[t]}]
                if t == 0:
                    content.insert(0, {"type": "image_url", "image_url": {"url": image}})
                messages.append({"role": "user", "content": content})
                answer, first, total = turn(url, messages, max_tokens)
                messages.append({"role": "assistant", "content": answer})
                done.append((first, total))
        return done

    before = stats(base)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for one in pool.map(client, range(clients)) for r in one]
    wall = time.perf_counter() - start
    after = stats(base)
    delta = {k: after[k] - before.get(k, 0) for k in ("image_encodings_requested", "image_encodings_run",
                                                     "prefill_tokens_submitted", "prefill_tokens_computed")}
    ttft = [first * 1000 for first, _ in done]
    return {
        "clients": clients, "requests": len(done), "rps": len(done) / wall,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "p50_ms": percentile([t * 1000 for _, t in done], 50),
        "encodings_run": delta["image_encodings_run"], "encodings_requested": delta["image_encodings_requested"],
        "prefill_computed": delta["prefill_tokens_computed"], "prefill_submitted": delta["prefill_tokens_submitted"],
        "replicas": [{"replica": r["replica"], "node": r.get("node"), "requests": sum(r["requests_by_status"].values())}
                     for r in after["replicas"]],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/v1/stats", timeout=60) as response:
        return json.loads(response.read())


def measure(quick: bool) -> dict[str, Any]:
    """Deploy each configuration in turn on a fresh multi-node cluster and run the same workload."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from actors.serve_app import build_app
    from jobs.make_tiny_model import make_tiny_model

    clients, per_client, max_tokens = (4, 1, 8) if quick else (16, 4, 32)
    runs = [("2 replicas, image-aware", 2, "image"), ("2 replicas, default", 2, "default")]
    if not quick:
        runs.insert(0, ("1 replica", 1, "image"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(NODES):
        cluster.add_node(num_cpus=2)
    results: dict[str, Any] = {"clients": clients, "conversations_per_client": per_client, "turns": TURNS,
                               "max_tokens": max_tokens, "nodes": 1 + NODES, "runs": {}}
    try:
        ray.init(address=cluster.address, include_dashboard=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            model = str(make_tiny_model(Path(tmp) / "model"))
            for k, (name, replicas, routing) in enumerate(runs):
                args = {"model": model, "max_new_tokens": max_tokens, "gpus_per_replica": 0, "dtype": "float32",
                        "page_size": 16, "prepare_workers": 0, "replicas": replicas, "routing": routing,
                        "max_ongoing_requests": 2 * clients, "max_queued_requests": 4 * clients}
                serve.run(build_app(args), name=f"run{k}", route_prefix=f"/run{k}")
                base = f"http://127.0.0.1:{port}/run{k}"
                conversations(base, 2, 1, 4, seed=90_000 + 100 * k)  # warm-up: loops, caches, connections
                results["runs"][name] = conversations(base, clients, per_client, max_tokens, seed=1000 * (k + 1))
                log.info("%s: %s", name, results["runs"][name])
                serve.delete(f"run{k}")
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to write the JSON results")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(args.out).write_text(json.dumps(measure(args.quick), indent=1))
    return 0


def run_apart(quick: bool) -> dict[str, Any]:
    """`measure` in a process of its own (see the module docstring)."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-replicas-out-") as tmp:
        out = Path(tmp) / "replicas.json"
        command = [sys.executable, "-m", "jobs.bench.serve_replicas", str(out)] + (["--quick"] if quick else [])
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"the replicas benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


if __name__ == "__main__":
    raise SystemExit(main())
