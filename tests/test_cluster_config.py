"""cluster.yaml passes Ray's own cluster-launcher validation (no cloud needed)."""

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema error
    head, gpu = config["available_node_types"]["head"], config["available_node_types"]["gpu_worker"]
    assert config["head_node_type"] == "head" and head["max_workers"] == 0
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance type
    assert any("ray[train,data,default]" in c for c in config["setup_commands"])
    # Not Ray's default AMI, whose Python and CUDA are too old for Ray 2.60 and torch.
    assert head["node_config"]["ImageId"] == gpu["node_config"]["ImageId"] != ""
