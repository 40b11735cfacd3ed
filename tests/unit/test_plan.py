"""Plan sizing and resume filters, without running a plan."""

from __future__ import annotations

import pyarrow as pa

from jobs.plan import drop_done, finished_ids, plan_resources
from pipeline.config import AnnotateConfig, EngineConfig


def _cfg(**kwargs) -> AnnotateConfig:
    return AnnotateConfig(input="in.parquet", output="out", engine=EngineConfig(model="m"), **kwargs)


def test_one_actor_per_gpu_and_cpu_actors_without_gpus():
    assert plan_resources(_cfg(), {"GPU": 4, "CPU": 32}).actors == (4, 4)
    cpu = plan_resources(_cfg(), {"CPU": 8})
    assert cpu.actors == (1, 1) and cpu.gpus_per_actor == 0
    assert plan_resources(_cfg(actors=(1, 3), gpus_per_actor=0.5), {"GPU": 2}).actors == (1, 3)


def test_a_cpu_actor_computes_with_its_share_of_a_node():
    """It reserves one CPU (the CPU stage must find room) but takes its node's cores as threads."""
    assert plan_resources(_cfg(), {"CPU": 2}, node_cpus=2) == plan_resources(_cfg(), {"CPU": 2}, 2)
    assert plan_resources(_cfg(), {"CPU": 2}, node_cpus=2).cpu_threads == 2
    assert plan_resources(_cfg(), {"CPU": 2}, node_cpus=2).cpus_per_actor == 1
    assert plan_resources(_cfg(actors=(1, 4)), {"CPU": 8}, node_cpus=8).cpu_threads == 2
    assert plan_resources(_cfg(), {"CPU": 24}, node_cpus=8).cpu_threads == 8  # one node's cores at most
    assert plan_resources(_cfg(actors=(3, 3)), {"CPU": 2}, node_cpus=2).cpu_threads == 1
    assert plan_resources(_cfg(), {"CPU": 4}).cpu_threads == 4  # node size unknown: the cluster's
    own = AnnotateConfig(input="in.parquet", output="out", engine=EngineConfig(model="m", cpu_threads=3))
    assert plan_resources(own, {"CPU": 16}, node_cpus=16).cpu_threads == 3
    assert plan_resources(_cfg(), {"GPU": 1, "CPU": 16}, node_cpus=16).cpu_threads is None


def test_finished_ids_with_and_without_questions():
    assert finished_ids(_cfg(), ["a", "b"], []) == ["a", "b"]
    fixed = _cfg(questions=("q1", "q2"))
    assert finished_ids(fixed, ["a", "b"], [("a", 0), ("a", 1), ("b", 0)]) == ["a"]
    assert finished_ids(_cfg(questions_column="asks"), ["a"], [("a", 0)]) == []


def test_drop_done_leaves_the_rest():
    batch = pa.table({"id": ["a", "b", "c"]})
    assert drop_done(batch, "id", pa.array(["b"])).column("id").to_pylist() == ["a", "c"]
