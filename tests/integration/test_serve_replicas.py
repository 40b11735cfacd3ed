"""The endpoint with several replicas, over real HTTP with the official `openai` client: autoscaling
under load and back, conversations kept on the replica that holds their image, a replica killed
mid-stream, an engine that hangs and is replaced, and a SIGTERM that drains the server.

Every application here runs on the session's Ray and one Serve instance of this module, except
the SIGTERM test, which starts `python -m jobs.serve` itself as an operator would.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.faults import hanging_server
from tests.helpers import data_url, noise_image, reference_chat

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMMON = {"gpus_per_replica": 0, "page_size": 16, "prepare_workers": 0, "max_new_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def question(image, text: str = "What is shown in this image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def model_of(base: str) -> str:
    return client(base).models.list().data[0].id


def stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/v1/stats", timeout=30) as response:
        return json.loads(response.read())


def post(base: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict]:
    """Status, JSON body and headers (lower-cased names) of a plain chat request."""
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), {k.lower(): v for k, v in exc.headers.items()}


def streams_then(base: str, images: list, max_tokens: int, act: Callable[[], Any]) -> tuple[list[dict], Any]:
    """A stream about each image at once, `act()` once every one has begun: the streams' results
    (see `stream`) and what `act` returned."""
    begun = [threading.Event() for _ in images]
    with ThreadPoolExecutor(len(images)) as pool:
        futures = [pool.submit(stream, base, question(image, "Describe the image in detail."), max_tokens, begun[k])
                   for k, image in enumerate(images)]
        assert all(event.wait(60) for event in begun)
        acted = act()
        return [f.result(timeout=120) for f in futures], acted


def stream(base: str, messages: list[dict], max_tokens: int, started: threading.Event | None = None) -> dict:
    """A streamed answer: its text, and the error the stream ended with (None when it finished)."""
    import openai

    c = client(base)
    pieces, error, start = [], None, time.monotonic()
    try:
        for chunk in c.chat.completions.create(model=model_of(base), messages=messages, max_tokens=max_tokens, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if started is not None:
                    started.set()
    except openai.APIError as exc:
        error = exc
    return {"text": "".join(pieces), "error": error, "seconds": time.monotonic() - start}


def running_replicas(app: str) -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    deployment = serve.status().applications[app].deployments["LlavaNextServer"]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


def wait_for(what, seconds: float, every: float = 0.5):
    deadline = time.monotonic() + seconds
    while not (value := what()):
        assert time.monotonic() < deadline, f"waited {seconds} s"
        time.sleep(every)
    return value


@pytest.fixture(scope="module")
def base(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def deploy(base: str, name: str, options: dict, server_class=None) -> str:
    from ray import serve

    from actors.serve_app import application
    from pipeline.serve_options import ServeOptions

    serve.run(application(ServeOptions.from_args(options), server_class), name=name, route_prefix=f"/{name}")
    return f"{base}/{name}"


@pytest.fixture(scope="module")
def two(base, tiny_model):
    """Two replicas, image-aware routing; four running requests each (overloaded at three)."""
    from ray import serve

    url = deploy(base, "two", {**COMMON, "model": tiny_model, "replicas": 2, "max_running_requests": 4})
    yield url
    serve.delete("two")


def images_homed_on_each(replica_ids: list[str], per_replica: int) -> list[tuple[Any, str]]:
    """(noise image, its home) pairs, `per_replica` of them homed on each replica by the router's
    rendezvous hash (replica ids are random, so fixed images would all land on one replica now and
    then)."""
    from actors.routing import image_key, rendezvous

    chosen: dict[str, list] = {r: [] for r in replica_ids}
    for seed in range(100, 1000):
        image = noise_image(40 + seed % 6, 30, seed=seed)
        home = rendezvous(image_key({"messages": question(image)}), replica_ids)
        if len(chosen[home]) < per_replica:
            chosen[home].append((image, home))
        if all(len(images) == per_replica for images in chosen.values()):
            return [pair for pairs in zip(*chosen.values()) for pair in pairs]
    raise AssertionError(f"no {per_replica} images for each of {replica_ids}")


def test_the_turns_of_a_conversation_about_one_image_stay_on_one_replica(two, reference):
    """Six conversations of four turns, one at a time, three homed on each replica: each lands
    whole on its image's home (Serve's default router would split most of them), and each image
    is encoded once in all."""
    c = client(two)

    def answered() -> dict[str, int]:
        return {r["replica"]: r["requests_by_status"].get("200", 0) for r in stats(two)["replicas"]}

    before_encodings = stats(two)["image_encodings_run"]
    replica_ids = sorted(answered())
    assert len(replica_ids) == 2, replica_ids
    homes = []
    for image, home in images_homed_on_each(replica_ids, 3):
        messages, before = question(image), answered()
        for turn in range(4):
            reply = c.chat.completions.create(model=model_of(two), messages=messages, max_tokens=8)
            if turn == 0:
                assert reply.choices[0].message.content == reference_chat(reference, messages, [image], 8)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": f"And turn {turn + 2}?"}]
        grew = {r: n - before.get(r, 0) for r, n in answered().items() if n != before.get(r, 0)}
        assert grew == {home: 4}, (grew, home)
        homes += list(grew)
    assert sorted(homes) == sorted(replica_ids * 3), homes  # both replicas took conversations
    assert stats(two)["image_encodings_run"] - before_encodings == 6


def test_a_replica_killed_mid_stream_ends_its_streams_and_the_other_finishes(two, reference):
    """Eight streams over two replicas; once all have begun, the process of the replica running the
    most of them is killed (the first one listed may hold none: the image router placed them)."""
    images = [noise_image(48, 36, seed=200 + k) for k in range(8)]

    def kill_the_busiest_replica() -> tuple[float, int, int]:
        replicas = sorted(stats(two)["replicas"], key=lambda one: one["running"])
        killed = time.monotonic()
        os.kill(replicas[-1]["pid"], signal.SIGKILL)
        return killed, replicas[-1]["running"], sum(one["running"] for one in replicas[:-1])

    results, (killed, on_victim, on_others) = streams_then(two, images, 200, kill_the_busiest_replica)
    failed = [r for r in results if r["error"] is not None]
    finished = [(r, image) for r, image in zip(results, images) if r["error"] is None]
    assert on_victim >= 1 and 1 <= len(failed) <= on_victim, (on_victim, [r["error"] for r in results])
    assert len(finished) >= on_others, (on_others, [r["error"] for r in results])
    for r in failed:
        assert "stopped mid-stream" in str(r["error"]) and r["seconds"] < time.monotonic() - killed + 60
    for r, image in finished:
        messages = question(image, "Describe the image in detail.")
        assert r["text"] == reference_chat(reference, messages, [image], 200)
    c = client(two)
    for k in range(4):  # the next requests succeed (on the survivor, or on Serve's replacement)
        assert c.chat.completions.create(model=model_of(two), messages=question(images[k]), max_tokens=4).choices


def test_autoscaling_goes_to_two_replicas_under_load_and_back_without_a_failed_request(base, tiny_model):
    """Two running slots (target: one ongoing request per replica), one-second delays."""
    from ray import serve

    url = deploy(base, "auto", {**COMMON, "model": tiny_model, "replicas": "1-2", "max_running_requests": 2,
                                "upscale_delay_s": 1, "downscale_delay_s": 2, "drain_s": 10})
    assert running_replicas("auto") == 1
    outcomes: list[str] = []
    active = [True] * 4  # four clients of sustained load, then one

    def load(k: int) -> None:
        image = noise_image(40, 30, seed=300 + k)
        while active[k]:
            r = stream(url, question(image), 32)
            outcomes.append("ok" if r["error"] is None and r["text"] else repr(r["error"]))

    try:
        with ThreadPoolExecutor(4) as pool:
            for k in range(4):
                pool.submit(load, k)
            wait_for(lambda: running_replicas("auto") == 2, 90)
            active[1:] = [False] * 3  # one client left: at the target, so back to one replica
            wait_for(lambda: running_replicas("auto") == 1, 90)
            time.sleep(2)  # the last client goes on across the change
            active[0] = False
    finally:
        active[:] = [False] * 4
        serve.delete("auto")
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]


def test_a_hung_engine_is_reported_unhealthy_and_replaced(base, tiny_model, tmp_path):
    """The engine's loop hangs on one request's tokens: requests get 503 engine_restarting with
    Retry-After, Serve replaces the replica, the endpoint answers again, one log line says why."""
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ordinary = set(tokenizer("[INST] What is shown in this image? [/INST]")["input_ids"])
    poison = sorted(set(tokenizer("zebra quartz")["input_ids"]) - ordinary - set(tokenizer.all_special_ids))
    url = deploy(base, "hang", {**COMMON, "model": tiny_model, "stall_s": 2, "drain_s": 1},
                 hanging_server(poison, str(tmp_path / "hung")))
    first = stats(url)["replicas"][0]["replica"]
    normal = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        with ThreadPoolExecutor(16) as pool:
            poisoned = pool.submit(post, url, {**normal, "messages": [{"role": "user", "content": "zebra quartz"}]})
            wait_for(lambda: (tmp_path / "hung").exists(), 30, 0.05)
            time.sleep(2.5)  # past stall_s: the replica knows its loop is stuck
            replies = []
            for _ in range(40):
                replies.append(pool.submit(post, url, normal))
                time.sleep(0.1)
            outcomes = [f.result(timeout=120) for f in replies]
            assert poisoned.result(timeout=120)[0] == 200  # retried on the replacement once the first died
        refused = [(body, headers) for status, body, headers in outcomes if status == 503]
        assert refused and all(b["error"]["code"] == "engine_restarting" and h["retry-after"] for b, h in refused)
        assert {status for status, _, _ in outcomes} <= {200, 503}
        assert post(url, normal)[0] == 200 and stats(url)["replicas"][0]["replica"] != first
        logs = ray._private.worker._global_node.get_logs_dir_path()
        lines = [line for path in glob.glob(f"{logs}/serve/replica_hang_LlavaNextServer_*.log")
                 for line in Path(path).read_text(errors="replace").splitlines() if "replica unhealthy:" in line]
        assert len(lines) == 1, lines
    finally:
        serve.delete("hang")


def test_sigterm_drains_the_server_its_streams_finish_and_new_requests_are_refused(tiny_model, reference):
    """`python -m jobs.serve` on its own Ray: SIGTERM while four streams run."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    server = subprocess.Popen(
        [sys.executable, "-m", "jobs.serve", "--model", tiny_model, "--port", str(port), "--drain-s", "30",
         "--prepare-workers", "0", "--page-size", "16"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: _healthy(url), 120)
        images = [noise_image(48, 36, seed=400 + k) for k in range(4)]

        def terminate() -> int:
            server.send_signal(signal.SIGTERM)
            time.sleep(3)
            return _status(url)

        results, late = streams_then(url, images, 120, terminate)
        for r, image in zip(results, images):
            assert r["error"] is None
            assert r["text"] == reference_chat(reference, question(image, "Describe the image in detail."), [image], 120)
        assert late != 200
        output, _ = server.communicate(timeout=90)
        assert server.returncode == 0 and "stopped cleanly" in output, output[-2000:]
    finally:
        if server.poll() is None:
            server.kill()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _status(url: str) -> int | None:
    """A new request's status, or None when the connection is refused."""
    try:
        return post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=30)[0]
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return None
