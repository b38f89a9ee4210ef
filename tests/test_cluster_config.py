"""cluster.yaml passes Ray's own cluster-launcher validation (no cloud needed)."""

import re

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


def test_every_node_type_names_an_instance_profile_that_the_readme_creates():
    # Ray's AWS launcher gives its default profile to the head node only; Ray Train uploads
    # checkpoints from a GPU worker, and scoring's S3 tasks run on any node.
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    readme = (REPO / "README.md").read_text()
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"node type {name} has no IAM instance profile"
        assert re.search(rf"create-instance-profile --instance-profile-name {profile['Name']}\b", readme)
