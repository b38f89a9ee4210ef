"""Online serving: real HTTP against a real Ray Serve application of a trained checkpoint."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import (PNG_MAGIC, REPO, assert_float32_close, free_port, interrupt, local_env, one_error_line,
                      png_bytes, read_until, request, short_ray_tmpdir, start)
from fmnist.cli import main
from fmnist.core.data import load_test_split
from fmnist.core.model_config import CLASS_NAMES
from fmnist.serve.haproxy import haproxy_ingress
from fmnist.serve.page import SAMPLES, page
from fmnist.serve.requests import MAX_BODY_BYTES, MAX_IMAGES


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> str:
    return str(trained_run.best_checkpoint)


@pytest.fixture(scope="module")
def images(real_data_dir, tmp_path_factory) -> list[Path]:
    """24 test images as PNG files, and one as a larger colour JPEG (resized and converted by the server)."""
    pixels, _ = load_test_split(real_data_dir)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(24):
        paths.append(folder / f"{i:02d}.png")
        paths[-1].write_bytes(png_bytes(pixels[i]))
    paths.append(folder / "99_big_rgb.jpg")
    Image.fromarray(pixels[24]).convert("RGB").resize((70, 70)).save(paths[-1], quality=90)
    return paths


def content_type(path: Path) -> str:
    return "image/png" if path.suffix == ".png" else "image/jpeg"


def test_predictions_equal_batch_scoring(server, checkpoint, images, tmp_path):
    assert main(["score", "--checkpoint", checkpoint, "--input", str(images[0].parent),
                 "--output", str(tmp_path / "predictions")]) == 0
    scored = pq.read_table(tmp_path / "predictions").sort_by("id").to_pylist()
    assert [row["path"] for row in scored] == [str(p) for p in images]

    one_by_one = []
    for path in images:
        status, answer, _ = request(f"{server}/predict", path.read_bytes(), content_type(path))
        assert status == 200, answer
        one_by_one.append(answer)
    status, answer, _ = request(f"{server}/predict", json.dumps(
        {"images": [base64.b64encode(p.read_bytes()).decode() for p in images]}).encode(), "application/json")
    assert status == 200, answer
    assert len(answer["predictions"]) == len(images)

    for got in (one_by_one, answer["predictions"]):
        for served, row in zip(got, scored):
            assert served["label"] == row["prediction"]
            assert served["class_name"] == row["predicted_class"]
            assert_float32_close(served["probabilities"], row["probabilities"])
            assert served["checkpoint"] == checkpoint


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS = {  # case -> (body, content type, status, words of the error)
    "not an image": (b"hello, world", "image/png", 400, "not a PNG/JPEG image"),
    "a truncated PNG": (None, "image/png", 400, "not a PNG/JPEG image"),  # body made from a real image below
    "an empty body": (b"", "image/png", 400, "empty"),
    "a wrong content type": (b"hello", "text/plain", 400, "Content-Type text/plain"),
    "no content type": (b"hello", None, 400, "Content-Type"),
    "bad base64": (json.dumps({"images": ["not base64!"]}).encode(), "application/json", 400, "images[0]"),
    "base64 of no image": (json.dumps({"images": [b64(b"hello")]}).encode(), "application/json", 400, "images[0]"),
    "JSON without images": (b'{"image": []}', "application/json", 400, "'images'"),
    "not JSON": (b"{images", "application/json", 400, "JSON"),
    "an empty list": (b'{"images": []}', "application/json", 400, "non-empty"),
    "too large a body": (b"\0" * (MAX_BODY_BYTES + 1), "image/png", 413, "limit"),
    "too many images": (json.dumps({"images": [b64(b"x")] * (MAX_IMAGES + 1)}).encode(), "application/json", 413,
                        "limit"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_answers_one_line_and_the_server_goes_on(server, images, case):
    body, kind, status, words = BAD_REQUESTS[case]
    if body is None:
        body = images[0].read_bytes()[:80]
    got, answer, _ = request(f"{server}/predict", body, kind)
    assert got == status, answer
    assert list(answer) == ["error"] and words in answer["error"] and "\n" not in answer["error"]

    status, answer, _ = request(f"{server}/predict", images[1].read_bytes(), "image/png")
    assert status == 200 and answer["label"] in range(10)


def test_concurrent_requests_are_answered_in_batches(server, images):
    body = images[0].read_bytes()
    _, alone, headers = request(f"{server}/predict", body, "image/png")
    assert headers["x-batch-size"] == "1"

    # 32 clients at once, 4 requests each: the replica stacks waiting images into one forward pass.
    def client(_) -> list[tuple[int, dict, dict]]:
        return [request(f"{server}/predict", body, "image/png") for _ in range(4)]

    with ThreadPoolExecutor(32) as pool:
        answers = [a for answers in pool.map(client, range(32)) for a in answers]
    assert all(status == 200 for status, _, _ in answers)
    for _, answer, _ in answers:  # a batch's matrix product may round in other last bits than one image's
        assert answer["label"] == alone["label"]
        assert_float32_close(answer["probabilities"], alone["probabilities"])
    batch_sizes = [int(headers["x-batch-size"]) for _, _, headers in answers]
    assert max(batch_sizes) > 1, batch_sizes


def test_health_page_and_routes(server):
    assert request(f"{server}/-/healthz")[:2] == (200, "success")  # Serve's own health check
    status, page, headers = request(f"{server}/")
    assert status == 200 and headers["content-type"].startswith("text/html") and "Ankle boot" in page
    assert request(f"{server}/predict")[0] == 405
    assert request(f"{server}/nowhere")[0] == 404


def test_http_comes_in_through_haproxy(server):
    # Serve's high-throughput ingress, as `fmnist serve` sets it up: about 6x the requests/s of
    # Serve's Python proxy on 2 cores (bench/RESULTS.md), which a change of Ray could silently lose.
    port = int(server.rsplit(":", 1)[1])
    listeners = [c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert [psutil.Process(pid).name() for pid in listeners] == ["haproxy"]


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no
    WebDriver or browser download, only Debian's chromium."""

    def __init__(self, profile: Path):
        to_chromium, self._writer = os.pipe()
        self._reader, from_chromium = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4: its ends go there from fds
        # above those, which the redirections below cannot overwrite before they are read.
        to_chromium, from_chromium = (self._above_4(fd) for fd in (to_chromium, from_chromium))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=800,600", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chromium} 4>&{from_chromium}', "bash", shutil.which("chromium"), *flags],
            pass_fds=(to_chromium, from_chromium), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer, self._id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    @staticmethod
    def _above_4(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def send(self, method: str, timeout_s: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:  # events arrive between answers: skip them
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._reader], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"no answer from chromium to {method} in {timeout_s} s"
                chunk = os.read(self._reader, 1 << 20)
                assert chunk, "chromium closed its pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer
                return answer["result"]

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"{expression} still false after {timeout_s} s"
            time.sleep(0.1)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._writer)
        os.close(self._reader)


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")


def bars_shown(browser: Chromium) -> list[dict]:
    """The page's result bars: each row's label, class name, percent and bar width."""
    return browser.evaluate("""[...document.querySelectorAll('#bars .row')].map(row => ({
        label: +row.dataset.label, name: row.querySelector('.class').textContent,
        percent: row.querySelector('.percent').textContent, width: row.querySelector('.fill').style.width}))""")


def assert_bars_show(shown: list[dict], answer: dict) -> None:
    """The bars are the answer's 3 most likely classes, most likely first, with its percents."""
    assert [row["label"] for row in shown] == list(np.argsort(answer["probabilities"])[::-1][:3])
    assert shown[0]["name"] == answer["class_name"]
    for row in shown:
        percent = f"{100 * answer['probabilities'][row['label']]:.1f}%"
        assert row["percent"] == percent and row["width"] == percent


@needs_chromium
def test_the_page_in_headless_chromium_shows_the_image_and_its_top_3_classes(server, images, tmp_path):
    _, answer, _ = request(f"{server}/predict", images[0].read_bytes(), "image/png")

    browser = Chromium(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=f"{server}/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('file')")
        document = browser.send("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.send("DOM.querySelector", nodeId=document, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=file_input, files=[str(images[0])])  # as a user chooses it
        browser.wait_for("document.body.dataset.state === 'done'")
        shown = bars_shown(browser)
        preview = browser.evaluate("document.getElementById('preview').naturalWidth")
        error_shown = browser.evaluate("!document.getElementById('error').hidden")
        screenshot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    (tmp_path / "page.png").write_bytes(screenshot)  # to look at: pytest's tmp_path of this test

    assert not error_shown
    assert preview == 28  # the image itself, shown
    assert_bars_show(shown, answer)
    assert screenshot.startswith(PNG_MAGIC) and Image.open(io.BytesIO(screenshot)).width == 800


@needs_chromium
def test_the_page_in_headless_chromium_classifies_a_sample_clicked(server, checkpoint, tmp_path):
    label = 6  # Shirt
    _, answer, _ = request(f"{server}/predict", base64.b64decode(SAMPLES[label]), "image/png")

    browser = Chromium(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=f"{server}/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('samples')")
        on_load = browser.evaluate("document.getElementById('checkpoint').textContent")
        samples = browser.evaluate("""[...document.querySelectorAll('#samples button')].map(button => ({
            label: +button.dataset.label, name: button.textContent, width: button.querySelector('img').naturalWidth}))""")
        # A real click where the sample shows: it must be on screen in an 800x600 window.
        box = browser.evaluate(f"""(({{x, y, width, height, bottom}}) => ({{x: x + width / 2, y: y + height / 2, bottom}}))(
            document.querySelector('#samples button[data-label="{label}"]').getBoundingClientRect())""")
        for kind in ("mousePressed", "mouseReleased"):
            browser.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)
        browser.wait_for("document.body.dataset.state === 'done'")
        shown = bars_shown(browser)
        error_shown = browser.evaluate("!document.getElementById('error').hidden")
        after = browser.evaluate("document.getElementById('checkpoint').textContent")
        bottom = browser.evaluate("document.getElementById('checkpoint').getBoundingClientRect().bottom")
        screenshot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    finally:
        browser.close()
    (tmp_path / "page_samples.png").write_bytes(screenshot)

    assert samples == [{"label": k, "name": name, "width": 28} for k, name in enumerate(CLASS_NAMES)]
    assert box["bottom"] <= 600 and bottom <= 600  # all of it fits the window, with the result shown
    assert not error_shown
    assert_bars_show(shown, answer)
    assert on_load == after == f"checkpoint: {checkpoint}"


def test_the_samples_are_the_first_test_image_of_each_class_and_the_page_escapes_its_checkpoint(real_data_dir):
    pixels, labels = load_test_split(real_data_dir)
    assert len(SAMPLES) == 10
    for label, sample in enumerate(SAMPLES):
        image = Image.open(io.BytesIO(base64.b64decode(sample)))
        assert image.format == "PNG" and image.mode == "L" and image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image), pixels[np.flatnonzero(labels == label)[0]])

    shown = page(CLASS_NAMES, "s3://b/<script>alert(1)</script>")
    assert "<script>alert(1)" not in shown
    assert "checkpoint: s3://b/&lt;script&gt;alert(1)&lt;/script&gt;</p>" in shown


def test_the_haproxy_settings_last_only_as_long_as_the_ray_they_start(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the user's own
    with haproxy_ingress() as why_not:
        assert why_not is None
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    # After the block: gone, so another fmnist serve started from here picks its own ports.
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and "RAY_SERVE_HAPROXY_METRICS_PORT" not in os.environ
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # off, as the user said
    with haproxy_ingress() as why_not:
        assert why_not is None and "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in os.environ


def test_bad_command_lines_fail_in_one_line_before_ray_starts(checkpoint, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "missing" in one_error_line(capsys)
    assert main(["serve", "--checkpoint", checkpoint, "--port", "70000"]) == 2
    assert "--port" in one_error_line(capsys)
    # A port in use, as `fmnist serve` on one's own machine (its own Ray, which it does not start).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(REPO / "workflows" / "serve.py"), "--checkpoint", checkpoint,
                               "--port", str(port)], env=local_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: cannot serve on 127.0.0.1:{port} (Address already in use); pass another --port or --host"]


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_its_ray_within_seconds(checkpoint, images):
    port = free_port()
    with short_ray_tmpdir() as ray_tmpdir:
        proc = start([sys.executable, str(REPO / "workflows" / "serve.py"), "--checkpoint", checkpoint,
                      "--port", str(port)], env=local_env(ray_tmpdir))  # its own embedded Ray
        started = read_until(proc, "Ctrl-C to stop", timeout_s=120)  # what a script waits for
        assert f"http://127.0.0.1:{port}/" in started
        assert request(f"http://127.0.0.1:{port}/predict", images[0].read_bytes(), "image/png")[0] == 200
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert "haproxy" in [p.name() for p in ray_processes]  # its own, beside the test session's
        output = interrupt(proc, within_s=15)
        assert proc.returncode == 130, output
        _, left = psutil.wait_procs(ray_processes, timeout=15)
        assert not left, f"processes left running: {[p.name() for p in left]}"
        with pytest.raises(OSError):
            request(f"http://127.0.0.1:{port}/-/healthz", timeout_s=2)


@pytest.mark.slow
def test_an_haproxy_that_cannot_start_fails_in_one_line_and_leaves_no_ray_running(checkpoint):
    with socket.socket() as taken, short_ray_tmpdir() as ray_tmpdir:
        taken.bind(("", 0))
        taken.listen()
        stats_port = taken.getsockname()[1]  # the user's RAY_SERVE_HAPROXY_STATS_PORT, in use
        done = subprocess.run([sys.executable, str(REPO / "workflows" / "serve.py"), "--checkpoint", checkpoint,
                               "--port", str(free_port())],
                              env=local_env(ray_tmpdir, {"RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port)}),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith("error: HAProxy, Serve's HTTP ingress, did not start: ")
        assert "Address already in use" in line and f":{stats_port}]" in line
        assert line.endswith("RAY_SERVE_ENABLE_HA_PROXY=0 where Ray starts serves through Serve's Python proxy instead")
        # Ray's processes name their session dir; those still exiting get a few seconds.
        deadline = time.monotonic() + 15
        while left := [p.info["name"] for p in psutil.process_iter(["name", "cmdline"])
                       if ray_tmpdir in " ".join(p.info["cmdline"] or [])]:
            assert time.monotonic() < deadline, f"processes left running: {left}"
            time.sleep(0.2)
