"""cluster.yaml as Ray's launcher reads it (no cloud needed): valid, installing the project from its own
files, on an image whose Ray and Python pyproject.toml admits, with IAM that docs/cluster.md creates."""

import fnmatch
import json
import re
import shlex

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO, pyproject


@pytest.fixture(scope="module")
def config() -> dict:
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema error
    return config


def setup_commands(config: dict) -> dict[str, list[str]]:
    """Each node type's setup commands, as the launcher runs them."""
    return {name: config["head_setup_commands"] if name == config["head_node_type"]
            else node_type.get("worker_setup_commands", config["worker_setup_commands"])
            for name, node_type in config["available_node_types"].items()}


def images(config: dict) -> dict[str, str]:
    """Each node type's Docker image."""
    docker = config["docker"]
    return {name: docker.get("head_image", docker["image"]) if name == config["head_node_type"]
            else node_type.get("docker", {}).get("worker_image", docker.get("worker_image", docker["image"]))
            for name, node_type in config["available_node_types"].items()}


def test_a_cpu_head_and_cpu_and_gpu_workers_that_autoscale_from_zero(config):
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1
    assert not types["cpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance type
    assert re.search(r"-cu\d+$", images(config)["gpu_worker"])  # CUDA in the GPU workers' image


def test_every_node_installs_the_projects_own_requirements_and_nothing_else(config):
    """No hand-copied list to drift: each node pip-installs the checkout that `ray up` mounts."""
    mounted = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(mounted) == 1, config["file_mounts"]
    checkout = mounted[0].replace("~", "$HOME", 1)
    extras = pyproject()["project"]["optional-dependencies"]
    for name, commands in setup_commands(config).items():
        installs = [shlex.split(c) for c in commands if "pip" in c]
        assert installs, f"node type {name} installs nothing"
        for words in installs:
            assert words[:2] == ["pip", "install"], words
            # Options and their values aside, the only thing installed is the checkout.
            packages = [w for w, before in zip(words[2:], words[1:])
                        if not w.startswith("-") and not before.endswith("index-url")]
            assert len(packages) == 1 and re.fullmatch(rf"{re.escape(checkout)}(\[.*\])?", packages[0]), words
            assert Requirement("fmnist" + packages[0].removeprefix(checkout)).extras <= set(extras), words


def test_the_images_ray_and_python_are_what_pyproject_admits(config):
    project = pyproject()["project"]
    ray = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    for name, image in images(config).items():
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cpu|cu\d+)", image)
        assert match, f"node type {name}: {image} is not one of Ray's own images"
        assert Version(match[1]) in ray.specifier, (image, str(ray))
        assert Version(f"3.{match[2]}") in SpecifierSet(project["requires-python"]), image
    # One Ray and one Python across the cluster: the head's and the workers' images differ in CUDA only.
    assert len({image.rsplit("-", 1)[0] for image in images(config).values()}) == 1


def test_every_node_type_names_an_instance_profile_that_the_docs_create(config):
    # Ray's AWS launcher gives its default profile to the head node only; Ray Train uploads
    # checkpoints from a GPU worker, and scoring's S3 tasks run on any node.
    docs = (REPO / "docs" / "cluster.md").read_text()
    for name, node_type in config["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {}).get("Name")
        assert profile, f"node type {name} has no IAM instance profile"
        assert re.search(rf"create-instance-profile --instance-profile-name {profile}\b", docs), profile


def allowed(policy: dict, action: str, resource: str) -> bool:
    return any(statement["Effect"] == "Allow"
               and any(fnmatch.fnmatchcase(action, a) for a in _list(statement["Action"]))
               and any(fnmatch.fnmatchcase(resource, r) for r in _list(statement["Resource"]))
               for statement in policy["Statement"])


def _list(value) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_the_head_policy_covers_what_the_autoscaler_does(config):
    """The head launches, tags, stops, restarts and ends the workers, handing them their role, and EC2
    resolves their resolve:ssm: image IDs with the head's rights."""
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert "file://docs/aws/head-policy.json" in docs  # the policy docs/cluster.md gives the head's role
    policy = json.loads((REPO / "docs" / "aws" / "head-policy.json").read_text())
    for action in ("RunInstances", "CreateTags", "DescribeInstances", "DescribeInstanceTypes", "DescribeImages",
                   "StartInstances", "StopInstances", "TerminateInstances"):
        assert allowed(policy, f"ec2:{action}", "*"), action
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        role = node_type["node_config"]["IamInstanceProfile"]["Name"]  # docs/cluster.md names role and profile alike
        assert allowed(policy, "iam:PassRole", f"arn:aws:iam::123456789012:role/{role}"), role
        image_id = node_type["node_config"]["ImageId"]
        if image_id.startswith("resolve:ssm:"):
            parameter = image_id.removeprefix("resolve:ssm:")
            assert allowed(policy, "ssm:GetParameters",
                           f"arn:aws:ssm:{config['provider']['region']}::parameter{parameter}"), image_id


def test_every_node_starts_ray_as_rays_haproxy_guide_asks_and_exports_metrics(config):
    # HAProxy on every node, reading its settings when Ray starts; HTTP on every interface, so that
    # other nodes' HAProxy reaches the replicas; a fixed metrics port for Prometheus to scrape.
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        [start] = [c for c in commands if "ray start" in c]
        words = shlex.split(start)
        settings = dict(w.split("=", 1) for w in words[:words.index("ray")])
        assert {k: settings.get(k) for k in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
                                             "RAY_SERVE_DEFAULT_HTTP_HOST", "RAY_AUTH_MODE")} == {
            "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DEFAULT_HTTP_HOST": "0.0.0.0", "RAY_AUTH_MODE": "token"}
        assert "--metrics-export-port=8080" in words
