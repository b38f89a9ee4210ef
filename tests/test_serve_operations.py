"""Running the model server: updating its model in place, replicas that follow the load, and its
metrics in Ray's Prometheus endpoint. Real HTTP against the session's real Serve application."""

from __future__ import annotations

import ast
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import ray
import yaml
from PIL import Image
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from conftest import REPO, free_port, local_env, one_error_line, png_bytes, ray_head_node, request, short_ray_tmpdir
from fmnist.cli import main
from fmnist.core.data import load_test_split
from fmnist.serve.app import APP_NAME, app
from fmnist.serve.haproxy import haproxy_ingress

VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def first_test_image_png(real_data_dir) -> bytes:
    pixels, _ = load_test_split(real_data_dir)
    return png_bytes(pixels[0])


@pytest.fixture
def original(server, trained_run) -> str:
    """The checkpoint the session's application serves; put back after the test, replicas and all."""
    checkpoint = str(trained_run.best_checkpoint)
    yield checkpoint
    assert main(["serve", "--checkpoint", checkpoint]) == 0


class Client(threading.Thread):
    """A closed-loop client on its own keep-alive connection, POSTing the PNG ``body`` until stopped; it keeps
    every answer's status and checkpoint, and the errors of requests that got no answer."""

    def __init__(self, server: str, body: bytes):
        super().__init__(daemon=True)
        self.address, self.body = urlsplit(server).netloc, body
        self.answers: list[tuple[int, str | None]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.address, timeout=30)
        while not self.stop.is_set():
            try:
                connection.request("POST", "/predict", self.body, {"Content-Type": "image/png"})
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(repr(e))
                connection.close()
                connection = http.client.HTTPConnection(self.address, timeout=30)
                continue
            checkpoint = json.loads(answer)["checkpoint"] if response.status == 200 else None
            self.answers.append((response.status, checkpoint))
        connection.close()


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(poll_s)
    return value


def test_a_new_checkpoint_replaces_the_model_without_downtime(
        server, original, first_test_image_png, tmp_path, capsys):
    new = tmp_path / "new_checkpoint"
    shutil.copytree(original, new)  # the same weights under another URI: the answers name it
    clients = [Client(server, first_test_image_png) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: all(c.answers for c in clients), 60, "answers before the update")
        assert main(["serve", "--checkpoint", str(new)]) == 0  # as a user runs it against the same Ray
        out = capsys.readouterr().out
        assert f"serves {new}" in " ".join(out.split())
        # The command returns once every replica serves the new checkpoint.
        count = [len(c.answers) for c in clients]
        wait_for(lambda: all(len(c.answers) > n + 5 for c, n in zip(clients, count)), 60, "answers after")
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(30)
    for client in clients:
        assert not client.errors, client.errors
        assert {status for status, _ in client.answers} == {200}
        served = [checkpoint for _, checkpoint in client.answers]
        switch = served.index(str(new))
        # Old, then new: never back.
        assert set(served[:switch]) == {original} and set(served[switch:]) == {str(new)}
    assert request(f"{server}/predict", first_test_image_png, "image/png")[1]["checkpoint"] == str(new)
    assert str(new) in request(f"{server}/")[1]  # the page names the checkpoint that answers


def test_a_bad_new_checkpoint_is_refused_in_one_line_and_the_old_one_goes_on(server, trained_run,
                                                                              first_test_image_png, tmp_path, capsys):
    original = str(trained_run.best_checkpoint)
    broken = tmp_path / "broken"
    shutil.copytree(original, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    for bad in (tmp_path / "missing", broken):
        assert main(["serve", "--checkpoint", str(bad)]) == 2
        assert str(bad) in one_error_line(capsys)
        status, answer, _ = request(f"{server}/predict", first_test_image_png, "image/png")
        assert status == 200 and answer["checkpoint"] == original


def replica_count() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["Classifier"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_replicas_follow_the_load_up_and_back_down(server, original, real_data_dir):
    assert main(["serve", "--checkpoint", original, "--replicas", "auto", "--max-replicas", "2"]) == 0
    assert replica_count() == 1
    # Requests that keep a replica busy (a 1,000 x 1,000 image to decode each), from more clients
    # than one replica's target of requests in flight.
    pixels, _ = load_test_split(real_data_dir)
    heavy = png_bytes(np.asarray(Image.fromarray(pixels[0]).resize((1000, 1000))))
    clients = [Client(server, heavy) for _ in range(32)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: replica_count() == 2, 120, "a second replica under load")
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(30)
    assert all(status == 200 for c in clients for status, _ in c.answers)
    assert not [e for c in clients for e in c.errors]
    wait_for(lambda: replica_count() == 1, 180, "back to one replica once the load stops", poll_s=2)


def prometheus_metrics() -> str:
    """What Ray's Prometheus endpoint on this node shows now (the port Prometheus scrapes)."""
    [node] = [n for n in ray.nodes() if n["Alive"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text: str, name: str, **tags: str) -> float:
    """The sum of a metric's samples whose labels include ``tags`` (0 where there are none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_requests_latency_batches_and_images_show_in_rays_prometheus_metrics(server, first_test_image_png):
    before = prometheus_metrics()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: request(f"{server}/predict", first_test_image_png, "image/png")[0],
                                 range(40)))
    assert statuses == [200] * 40
    assert request(f"{server}/predict", b"not an image", "image/png")[0] == 400
    assert request(f"{server}/nowhere")[0] == 404

    def counted() -> str | None:  # replicas report every few seconds
        text = prometheus_metrics()
        grew = metric(text, "ray_fmnist_requests_total", route="/predict", status="200") >= \
            metric(before, "ray_fmnist_requests_total", route="/predict", status="200") + 40
        return text if grew else None

    text = wait_for(counted, 60, "the requests in Ray's metrics", poll_s=1)
    assert metric(text, "ray_fmnist_requests_total", route="/predict", status="400") >= 1
    assert metric(text, "ray_fmnist_requests_total", route="other", status="404") >= 1
    tags = {"application": APP_NAME, "deployment": "Classifier"}
    assert metric(text, "ray_fmnist_request_latency_ms_count", route="/predict", **tags) >= 41
    assert metric(text, "ray_fmnist_images_decoded_total", **tags) >= \
        metric(before, "ray_fmnist_images_decoded_total", **tags) + 40
    # Every image went through a batch; under 8 clients some batches held several.
    batches, images = (metric(text, f"ray_fmnist_batch_size_{kind}") for kind in ("count", "sum"))
    assert images >= 40 and batches <= images
    assert metric(text, "ray_fmnist_batch_size_bucket", le="64.0") == batches


def deploy_config(checkpoint: str, port: int, user_config: dict | None = None) -> dict:
    """deploy/serve_config.yaml, serving ``checkpoint`` on 127.0.0.1:``port`` with fixed replicas."""
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    [application] = config["applications"]
    application["args"].update(checkpoint=checkpoint, replicas=1)
    application["args"].pop("max_replicas")
    if user_config:
        application["deployments"] = [{"name": "Classifier", "user_config": user_config}]
    return config


def test_the_serve_deploy_config_is_valid_and_builds_the_application(trained_run):
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # as serve deploy reads it
    [application] = config["applications"]
    assert application["import_path"] == "fmnist.serve.app:app"
    args = {**application["args"], "checkpoint": str(trained_run.best_checkpoint)}
    assert isinstance(app(args), Application)  # every argument it names is one the builder takes


@pytest.fixture(scope="module")
def serve_head():
    """A head node as a user starts it for `serve deploy` (its dashboard takes the config), with
    Serve's HAProxy ingress; the environment its commands run in, and its dashboard's address."""
    with short_ray_tmpdir() as ray_tmpdir, haproxy_ingress():  # HAProxy's ports chosen free, as fmnist serve does
        env = local_env(ray_tmpdir, {"RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"})
        with ray_head_node(env) as (address, dashboard):
            yield {**env, "RAY_ADDRESS": address}, dashboard


def serve_deploy(serve_head, config: dict, tmp_path: Path) -> None:
    env, dashboard = serve_head
    file = tmp_path / f"serve_config_{time.monotonic_ns()}.yaml"
    file.write_text(yaml.safe_dump(config))
    for _ in range(30):  # Serve's agent on the head takes a few seconds more than the dashboard
        done = subprocess.run(["serve", "deploy", str(file), "--address", dashboard], env=env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(done.stdout + done.stderr)


def replica_names(serve_head) -> list[str]:
    """The running replicas' actor names on the head node's Ray (a new replica has a new name)."""
    env, _ = serve_head
    listing = ("import ray; from ray.util import list_named_actors; ray.init(); "
               "print(sorted(a['name'] for a in list_named_actors(all_namespaces=True) if 'Classifier' in a['name']))")
    done = subprocess.run([sys.executable, "-c", listing], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_serve_deploy_of_a_new_user_config_switches_the_running_replicas_in_place(
        serve_head, trained_run, first_test_image_png, tmp_path):
    original = str(trained_run.best_checkpoint)
    new = tmp_path / "new_checkpoint"
    shutil.copytree(original, new)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    serve_deploy(serve_head, deploy_config(original, port), tmp_path)
    try:
        wait_for(lambda: request_or_none(server, first_test_image_png) == original, 180, "the deployed application")
    except AssertionError:
        status = subprocess.run(["serve", "status", "--address", serve_head[1]], env=serve_head[0],
                                capture_output=True, text=True)
        raise AssertionError(status.stdout + status.stderr) from None
    replicas = replica_names(serve_head)

    client = Client(server, first_test_image_png)
    client.start()
    try:
        serve_deploy(serve_head, deploy_config(original, port, {"checkpoint": str(new)}), tmp_path)
        wait_for(lambda: client.answers and client.answers[-1][1] == str(new), 120, "the new checkpoint")
    finally:
        client.stop.set()
        client.join(30)
    assert not client.errors and {status for status, _ in client.answers} == {200}
    served = [checkpoint for _, checkpoint in client.answers]
    switch = served.index(str(new))
    assert set(served[:switch]) == {original} and set(served[switch:]) == {str(new)}
    assert replica_names(serve_head) == replicas  # the same replicas: reconfigured, not restarted


def request_or_none(server: str, body: bytes) -> str | None:
    """The checkpoint that answers a PNG, or None while nothing answers."""
    try:
        status, answer, _ = request(f"{server}/predict", body, "image/png", timeout_s=5)
    except OSError:
        return None
    return answer["checkpoint"] if status == 200 else None
