"""Shared fixtures: the tiny checkpoint (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A freshly built tiny checkpoint directory, through the project's own builder."""
    from jobs.make_tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, bound to loopback.

    Logical CPUs exceed the physical two so that actor pools never starve the read and
    preprocess tasks of a plan.
    """
    import ray

    ray.init(
        num_cpus=6,
        include_dashboard=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def engine(tiny_model):
    """The project's engine on the tiny checkpoint, greedy, short answers."""
    from actors.engine import Engine
    from pipeline.config import EngineConfig

    return Engine(EngineConfig(model=tiny_model, max_new_tokens=12))


@pytest.fixture(scope="session")
def reference(tiny_model):
    """transformers' own processor and model on the tiny checkpoint: the answers we must equal."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_model).eval()
    return processor, model
