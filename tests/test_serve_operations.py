"""Running the model server: updating its model in place, replicas that follow the load, and its
metrics in Ray's Prometheus endpoint. Real HTTP against the session's real Serve application."""

from __future__ import annotations

import http.client
import io
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve

from conftest import one_error_line, request
from fmnist.cli import main
from fmnist.data import load_test_split
from fmnist.serving import APP_NAME


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def test_png(real_data_dir) -> bytes:
    pixels, _ = load_test_split(real_data_dir)
    return png(pixels[0])


@pytest.fixture
def original(server, trained_run) -> str:
    """The checkpoint the session's application serves; put back after the test, replicas and all."""
    checkpoint = str(trained_run.best_checkpoint)
    yield checkpoint
    assert main(["serve", "--checkpoint", checkpoint]) == 0


class Client(threading.Thread):
    """A closed-loop client on its own keep-alive connection, POSTing ``body`` until stopped; it keeps
    every answer's status and checkpoint, and the errors of requests that got no answer."""

    def __init__(self, server: str, body: bytes, content_type: str = "image/png"):
        super().__init__(daemon=True)
        self.address, self.body, self.content_type = urlsplit(server).netloc, body, content_type
        self.answers: list[tuple[int, str | None]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.address, timeout=30)
        while not self.stop.is_set():
            try:
                connection.request("POST", "/predict", self.body, {"Content-Type": self.content_type})
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(repr(e))
                connection.close()
                connection = http.client.HTTPConnection(self.address, timeout=30)
                continue
            checkpoint = None
            if response.status == 200 and self.content_type == "image/png":
                import json

                checkpoint = json.loads(answer)["checkpoint"]
            self.answers.append((response.status, checkpoint))
        connection.close()


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(poll_s)
    return value


def test_a_new_checkpoint_replaces_the_model_in_place_and_no_request_fails(
        server, original, test_png, tmp_path, capsys):
    new = tmp_path / "new_checkpoint"
    shutil.copytree(original, new)  # the same weights under another URI: the answers name it
    clients = [Client(server, test_png) for _ in range(4)]
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
    assert request(f"{server}/predict", test_png, "image/png")[1]["checkpoint"] == str(new)
    assert str(new) in request(f"{server}/")[1]  # the page names the checkpoint that answers


def test_a_bad_new_checkpoint_is_refused_in_one_line_and_the_old_one_goes_on(server, original, test_png,
                                                                              tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(original, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    for bad in (tmp_path / "missing", broken):
        assert main(["serve", "--checkpoint", str(bad)]) == 2
        assert str(bad) in one_error_line(capsys)
        status, answer, _ = request(f"{server}/predict", test_png, "image/png")
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
    heavy = png(np.asarray(Image.fromarray(pixels[0]).resize((1000, 1000))))
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


def test_requests_latency_batches_and_images_show_in_rays_prometheus_metrics(server, test_png):
    before = prometheus_metrics()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: request(f"{server}/predict", test_png, "image/png")[0], range(40)))
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
