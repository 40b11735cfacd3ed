"""Shared fixtures: the tiny checkpoint (built once per session)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A freshly built tiny checkpoint directory, through the project's own builder."""
    from jobs.make_tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(grpc_offset: int = 0) -> int:
    """A loopback port nothing listens on right now (and, for SeaweedFS, its gRPC port + 10000)."""
    import random

    while True:
        port = random.randint(20000, 45000)
        if _is_free(port) and (not grpc_offset or _is_free(port + grpc_offset)):
            return port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 store (SeaweedFS) on loopback ports, its endpoint exported the standard AWS way.

    The variables are set before Ray starts, so Ray's workers inherit them too.
    """
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    data = tmp_path_factory.mktemp("seaweed")
    port = free_port(10000)
    cmd = [
        weed, "server", f"-dir={data}", "-s3", f"-s3.port={port}",
        f"-master.port={free_port(10000)}", f"-volume.port={free_port(10000)}",
        f"-filer.port={free_port(10000)}", f"-s3.port.iceberg={free_port()}",
        f"-s3.port.lance={free_port()}", f"-s3.port.grpc={free_port()}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        # Every bucket takes volumes of its own: small volumes and many slots, or later buckets fail.
        "-master.volumeSizeLimitMB=64", "-volume.max=200",
    ]
    with open(data / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.mkdir("probe")
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {data / 'weed.log'}")
            time.sleep(0.5)
    yield fs
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for the whole session, bound to loopback.

    Logical CPUs exceed the physical two so that actor pools never starve the read and
    preprocess tasks of a plan.
    """
    import ray

    ray.init(
        address="local",  # a new instance, never a cluster some other process left running
        num_cpus=6,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The project's engine on the tiny checkpoint (continuous scheduler), greedy, short answers.

    Pages of 16 tokens: the tiny model's images are tens of tokens, so shared image prefixes
    span whole pages and their KV blocks can be reused.
    """
    from actors.engine import Engine
    from pipeline.config import EngineConfig

    engine = Engine(EngineConfig(model=tiny_model, max_new_tokens=12, page_size=16))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def static_engine(tiny_model):
    """The same engine on the static scheduler (whole batches through `generate`)."""
    from actors.engine import Engine
    from pipeline.config import EngineConfig

    return Engine(EngineConfig(model=tiny_model, max_new_tokens=12, scheduler="static"))


@pytest.fixture(params=["continuous", "static"])
def any_engine(request):
    """Each scheduler in turn, for what both must do alike."""
    return request.getfixturevalue("engine" if request.param == "continuous" else "static_engine")


@pytest.fixture(scope="session")
def reference(tiny_model):
    """transformers' own processor and model on the tiny checkpoint: the answers we must equal."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_model).eval()
    return processor, model
