"""The endpoint as a monitored service: over real HTTP with the official `openai` client, the first
streamed event is the role with the first text, and after the traffic every metric the README
lists is on Ray's Prometheus endpoint with the values that traffic implies."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import data_url, noise_image

pytestmark = pytest.mark.integration

APP = "llava-metrics"
MAX_TOKENS = 8
README = Path(__file__).resolve().parents[2] / "README.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_local, tiny_model):
    from ray import serve

    from actors.serve_app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": tiny_model, "max_new_tokens": MAX_TOKENS, "gpus_per_replica": 0, "page_size": 16,
            "prepare_workers": 0}
    serve.run(build_app(args), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _messages(image=None, question: str = "What is shown in this image?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def _raw_stream(server: str, body: dict) -> str:
    """A streamed reply's body as it came over the wire, comments and all."""
    request = urllib.request.Request(f"{server}/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def traffic(server):
    """Every request this module sends, made once: (kind, usage, chunks or raw body, text).

    Two images, one asked about three times (its features and image prefix are reused), one
    text-only question, and one answer cut to nothing by a stop string.
    """
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    seen, again = noise_image(61, 43, seed=31), noise_image(45, 70, seed=32)
    sent = []

    def ask(messages: list[dict], stream: bool, **extra):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, stream=stream,
                                               **({"stream_options": {"include_usage": True}} if stream else {}),
                                               **extra)
        if not stream:
            sent.append(("plain", reply.usage, None, reply.choices[0].message.content))
            return reply.choices[0].message.content
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        sent.append(("stream", chunks[-1].usage, chunks, text))
        return text

    whole = ask(_messages(seen), stream=False)
    ask(_messages(seen, "Describe it."), stream=True)
    ask(_messages(seen, "What colour is it?"), stream=True)
    ask(_messages(again), stream=True)
    ask(_messages(question="Say something."), stream=True)
    ask(_messages(seen), stream=True, stop=[whole[:1]])
    raw = _raw_stream(server, {"model": model, "messages": _messages(again, "Describe it."), "max_tokens": MAX_TOKENS,
                               "stream_options": {"include_usage": True}})
    usage = json.loads(raw.split("\n\n")[-3].removeprefix("data: "))["usage"]
    sent.append(("raw", SimpleNamespace(**usage), raw, None))
    return {"sent": sent, "whole": whole, "images": {"requested": 6, "distinct": 2}}


def test_the_first_streamed_event_is_the_role_with_the_first_text(traffic):
    streams = [(chunks, text) for kind, _, chunks, text in traffic["sent"] if kind == "stream"]
    assert len(streams) == 5
    for chunks, text in streams:
        first = chunks[0].choices[0]
        assert first.delta.role == "assistant"
        assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
        if text:
            assert first.delta.content and text.startswith(first.delta.content) and first.finish_reason is None
        else:  # the answer the stop string cut to nothing: the role comes with the finish
            assert first.delta.content == "" and first.finish_reason == "stop"
    assert sum(1 for _, text in streams if not text) == 1
    # Over the wire, nothing comes before that event: no role-only event, no comment.
    raw = next(chunks for kind, _, chunks, _ in traffic["sent"] if kind == "raw")
    event = json.loads(raw.split("\n\n")[0].removeprefix("data: "))
    assert event["choices"][0]["delta"]["role"] == "assistant" and event["choices"][0]["delta"]["content"]


def _readme_metrics() -> dict[str, str]:
    """The README's metrics table: name -> type."""
    section = README.read_text().split("### Metrics", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(ray_[a-z_]+)` \| (counter|gauge|histogram) \|", section, re.MULTILINE))


def _scrape() -> dict[str, float]:
    """This application's samples on the node's Prometheus endpoint, by name (summed over the
    other tags: one replica, but the request counter is split by status)."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("application") != APP or sample.labels.get("le") is not None:
                continue
            key = sample.name + (f"{{status={sample.labels['status']}}}" if "status" in sample.labels else "")
            samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def test_every_readme_metric_is_exported_with_what_the_traffic_did(traffic):
    listed = _readme_metrics()
    assert len(listed) == 13 and set(listed.values()) == {"counter", "gauge", "histogram"}
    requests = len(traffic["sent"])
    engine_ttft = "ray_llava_engine_time_to_first_token_seconds_count"
    deadline, samples = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # Ray exports every few seconds; gauges follow within one
        samples = _scrape()
        if samples.get(engine_ttft) == requests and samples.get("ray_llava_engine_requests_running") == 0:
            break
        time.sleep(1)
    names = {key.split("{")[0] for key in samples}
    missing = [n for n, kind in listed.items() if (n + "_count" if kind == "histogram" else n) not in names]
    assert not missing, f"not on the Prometheus endpoint: {missing}; there: {sorted(names)}"

    assert samples[engine_ttft] == requests and samples["ray_llava_engine_time_to_first_token_seconds_sum"] > 0
    several = sum(1 for _, usage, _, _ in traffic["sent"] if usage.completion_tokens >= 2)
    assert 0 < samples["ray_llava_engine_time_per_output_token_seconds_count"] == several
    assert samples["ray_llava_engine_time_per_output_token_seconds_sum"] > 0
    assert samples["ray_llava_engine_requests_running"] == samples["ray_llava_engine_requests_waiting"] == 0
    assert samples["ray_llava_engine_kv_cache_tokens_used"] == 0 < samples["ray_llava_engine_kv_cache_tokens_total"]
    images = traffic["images"]
    assert samples["ray_llava_engine_image_cache_misses_total"] == images["distinct"]
    assert samples["ray_llava_engine_image_cache_hits_total"] == images["requested"] - images["distinct"]
    # every prompt token was either computed or taken from a stored image prefix, and some were taken
    prompts = sum(usage.prompt_tokens for _, usage, _, _ in traffic["sent"])
    matched = samples["ray_llava_engine_prefill_tokens_matched_total"]
    assert 0 < matched < prompts and samples["ray_llava_engine_prefill_tokens_computed_total"] == prompts - matched
    assert samples["ray_llava_engine_loop_restarts_total"] == 0
    assert samples["ray_llava_requests_total{status=200}"] == requests
    assert samples["ray_llava_request_latency_ms_count"] == requests


def test_engine_series_name_the_replica(server, traffic):
    """One replica: every engine series carries its deployment and its one replica id."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray.nodes()[0]["MetricsExportPort"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    labels = [s.labels for f in families if f.name.startswith("ray_llava_engine_") for s in f.samples
              if s.labels.get("application") == APP]
    assert labels and {(lab["deployment"], lab["replica"]) for lab in labels} == {
        ("LlavaNextServer", labels[0]["replica"])}
    assert labels[0]["replica"]
