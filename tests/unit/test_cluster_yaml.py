"""cluster.yaml is a valid Ray cluster-launcher config with CPU and GPU worker groups."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"]["CPU"] == 0
    assert any(n["resources"].get("GPU") for n in nodes.values())
    assert any(not n["resources"].get("GPU") and n.get("max_workers", 0) > 0 for n in nodes.values())
    setup = " ".join(config["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -e" in setup
