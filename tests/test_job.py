"""`ray job submit` of training to a real head node started with `ray start --head`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, ray_head_node, request

pytestmark = pytest.mark.slow  # a real head node, and jobs submitted to it

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A head node as a user starts it, token authentication on, with its own HOME (no token yet).

    PYTHONPATH puts a stand-in `fmnist` that refuses to import in front of the installed
    package: the job must run from the code it ships with --working-dir, as on a cluster
    whose nodes have the dependencies but not this package.
    """
    home = tmp_path_factory.mktemp("home")
    shadow = home / "shadow" / "fmnist"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the installed fmnist must not be used')\n")
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(shadow.parent),
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    for name in [n for n in env if n.startswith("AWS_")]:  # storage settings come with each job, as on a cluster
        env.pop(name)
    # As a user does once per machine: the token that the head node and `ray job submit` share.
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    with ray_head_node(env) as (_, address):
        yield address, env


def _submit(head_node, *options: str, workflow: str = "train", job_env: dict | None = None,
            submission_id: str | None = None) -> tuple[int, str]:
    """`ray job submit` of workflows/<workflow>.py with these options (and ``job_env`` in the job's
    runtime environment); its exit status and output. With ``submission_id``, it does not wait for the job."""
    address, env = head_node
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
    detached = ["--no-wait", "--submission-id", submission_id] if submission_id else []
    command = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), *runtime_env, *detached,
               "--", "python", f"workflows/{workflow}.py", *options]
    for attempt in range(10):  # the job agent takes a few seconds more than the dashboard
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(3)
    return job.returncode, job.stdout + job.stderr


def test_a_job_gives_the_cluster_resource_timeout_to_grow(head_node, tmp_path, real_data_dir):
    code, output = _submit(head_node, "--num-workers", "3", "--resource-timeout", "5",
                           "--storage-path", str(tmp_path), "--data-dir", str(real_data_dir))
    # As on an autoscaling cluster, it waits for nodes that may come (a laptop's own Ray cannot
    # grow: there it fails at once), then says what is missing.
    assert "Waiting up to 5 s for the cluster to make room for training with 3 workers" in output
    assert code != 0 and "error: training with 3 workers needs 3 CPU but the cluster has 2 CPU" in output


def test_a_training_job_runs_the_code_it_ships_and_gets_its_s3_settings_from_the_runtime_env(
        head_node, s3_server, bucket, real_data_dir):
    # The head node has no S3 settings; the job's runtime environment brings them to its driver and
    # to the Ray Train workers, which upload the checkpoints.
    code, output = _submit(head_node, "--epochs", "1", "--num-workers", "2", "--storage-path",
                           f"s3://{bucket}/runs", "--name", "job", "--data-dir", str(real_data_dir),
                           job_env=s3_server.env)
    assert code == 0, output
    assert "succeeded" in output
    shown = " ".join(output.split())  # rich wraps long lines where stdout is no terminal
    assert "on 2 workers (CPU, 1 thread each)" in shown  # on a cluster, Ray Train's 1 CPU per worker
    assert "best checkpoint:" in output
    assert "testing-secret" not in output  # never a secret
    keys = s3_server.keys(bucket, "runs/job/")
    assert s3_server.get(bucket, "runs/job/history.csv").decode().count("\n") == 2
    assert any(k.endswith("/model.safetensors") for k in keys)


def test_ray_job_stop_removes_the_served_application(head_node, trained_run):
    address, env = head_node
    port = free_port()
    routes = f"http://127.0.0.1:{port}/-/routes"

    def routes_are(expected: dict, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if request(routes, timeout_s=5)[1] == expected:
                    return
            except OSError:
                pass  # Serve's proxy not up yet
            assert time.monotonic() < deadline, f"{routes} never answered {expected}"
            time.sleep(1)

    code, output = _submit(head_node, "--checkpoint", str(trained_run.best_checkpoint), "--port", str(port),
                           workflow="serve", submission_id="serve")
    assert code == 0, output
    routes_are({"/": "fmnist"}, timeout_s=180)
    subprocess.run(["ray", "job", "stop", "--address", address, "serve"], env=env, check=True, capture_output=True,
                   timeout=120)
    # ray job stop sends SIGTERM: the command removes its application, and Serve, which outlives any
    # driver on a cluster, goes on with none.
    routes_are({}, timeout_s=60)
    logs = subprocess.run(["ray", "job", "logs", "--address", address, "serve"], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert "Removing the application 'fmnist'" in logs and "SIGTERM received" not in logs, logs  # not Ray's stack dump
