"""Shared fixtures: one Ray instance for the whole session, and one real training run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import ray
from PIL import Image

from fmnist.core.data import find_data_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
# Every Ray the tests start (the session's, and those of the commands they run): Ray Train's
# controller polls its workers every 0.2 s instead of 2 s, which ends each run about 3 s sooner
# (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, ray/train/v2/_internal/constants.py). A test-time setting
# only: what a run does does not change, only how soon the driver learns that it ended.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


def pyproject() -> dict:
    """The project's pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# Float32 holds about 7 significant digits. A forward pass adds up hundreds of products, and
# another CPU or BLAS kernel (or another batch size) adds them in another order, so results differ
# in their last bits, in proportion to the size of the values summed: compare relative to size,
# with an absolute floor for values near 0 (the probabilities of unlikely classes). About 10x the
# largest difference seen between machines (1.2e-6 on a probability).
FLOAT32_RTOL, FLOAT32_ATOL = 1e-5, 2e-5


def assert_float32_close(actual, expected) -> None:
    """Float32 model outputs (probabilities, log-probabilities) equal up to rounding."""
    np.testing.assert_allclose(actual, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


def assert_same_classes(predicted, reference_log_probs) -> int:
    """The classes ``predicted`` are the reference's, except at near-ties (top two log-probabilities
    within float32 rounding), where another kernel may round the other way. Returns how many
    images could flip so, for a caller comparing accuracies."""
    reference_log_probs = np.asarray(reference_log_probs)
    top_two = np.sort(reference_log_probs, axis=1)[:, -2:]
    near_tie = top_two[:, 1] - top_two[:, 0] <= FLOAT32_ATOL + FLOAT32_RTOL * np.abs(top_two[:, 1])
    differ = np.asarray(predicted) != reference_log_probs.argmax(axis=1)
    assert not (differ & ~near_tie).any(), f"{int((differ & ~near_tie).sum())} images classed otherwise"
    return int(near_tie.sum())


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 image as PNG file bytes."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | None = None, content_type: str | None = None,
            timeout_s: float = 30) -> tuple[int, dict | str, dict]:
    """One HTTP request: the status, the body (JSON decoded where it is JSON) and the headers."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            status, data, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, data, headers = e.code, e.read(), dict(e.headers)
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, json.loads(data) if is_json else data.decode(), headers


# Runs an fmnist command line in a process of its own (python -c), and says which of torch and Ray it imported.
IMPORTS_SHOWN = ("import sys; from fmnist.cli import main; code = main(sys.argv[1:]); "
                 "print('imported:', sorted({'torch', 'ray'} & sys.modules.keys())); sys.exit(code)")


def local_env(ray_tmpdir: str | None = None, extra: dict | None = None) -> dict:
    """A user's environment on their own machine: no RAY_ADDRESS (this suite's Ray is not theirs), and
    ``ray_tmpdir`` as RAY_TMPDIR where given (see short_ray_tmpdir)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, **({"RAY_TMPDIR": ray_tmpdir} if ray_tmpdir else {}), **(extra or {})}


def one_error_line(capsys) -> str:
    """What a refused command printed: exactly one 'error: ...' line on stderr, which it returns."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def start(command: list[str], **popen) -> subprocess.Popen:
    """``command`` in a process of its own and its own process group, for interrupt() to reach as
    Ctrl-C in a terminal reaches a command; its output (stdout and stderr) in one text stream."""
    # Where this suite runs as a background job, SIGINT is ignored, and a child would inherit that;
    # a handled signal is reset to its default on exec instead.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **popen)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_until(proc: subprocess.Popen, condition: Callable[[], object], timeout_s: float = 180,
               poll_s: float = 0.1) -> None:
    """Wait for ``condition()`` while ``proc`` runs; fail with its output if it ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(poll_s)


def read_until(proc: subprocess.Popen, text: str, timeout_s: float = 180) -> str:
    """The output of ``proc`` (started by start()) up to the line holding ``text``, which it must print
    within ``timeout_s`` seconds; the rest is still there for interrupt() or communicate()."""
    fd, output, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout_s
    while (at := output.find(text.encode())) < 0 or b"\n" not in output[at:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1 << 16) if ready else b""
        assert chunk, f"no line with {text!r} in {timeout_s} s, or it ended:\n{output.decode(errors='replace')}"
        output += chunk
    return output.decode(errors="replace")


def interrupt(proc: subprocess.Popen, within_s: float = 60) -> str:
    """Ctrl-C as in a terminal (SIGINT to the whole process group); the output of ``proc``, which must
    end within ``within_s`` seconds."""
    os.killpg(proc.pid, signal.SIGINT)
    interrupted_at = time.monotonic()
    output, _ = proc.communicate(timeout=within_s + 60)
    assert time.monotonic() - interrupted_at < within_s, f"Ctrl-C took too long to stop it:\n{output}"
    return output


def break_once_written(file: Path, timeout_s: float = 300) -> None:
    """In a thread: as soon as ``file`` exists, put a directory in its place, so that it can no longer
    be replaced (a run directory that stops taking writes)."""
    def replace_with_a_directory() -> None:
        deadline = time.monotonic() + timeout_s
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        file.unlink()
        file.mkdir()

    threading.Thread(target=replace_with_a_directory, daemon=True).start()


@contextlib.contextmanager
def short_ray_tmpdir() -> Iterator[str]:
    """A RAY_TMPDIR for a command's own Ray session, removed afterwards; short, as Ray's socket paths
    must fit in 107 characters."""
    path = tempfile.mkdtemp(prefix="ray")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def ray_head_node(env: dict, num_cpus: int = 2) -> Iterator[tuple[str, str]]:
    """`ray start --head` as a user runs it, in ``env`` (which finds the `ray` command); its GCS
    address and its dashboard's URL, once the dashboard answers. Stopped afterwards."""
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
         "--num-cpus", str(num_cpus), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError as e:
                if "401" in str(e) or "403" in str(e):
                    break  # up, and asking for the token
                assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
                time.sleep(1)
        yield f"127.0.0.1:{port}", address
    finally:
        # On SIGTERM a head node drains for up to 30 s before it stops: nothing here needs that.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def worker_processes(ray_tmpdir: str) -> list[tuple[list[str], set[str]]]:
    """Each worker process of the Ray session under ``ray_tmpdir``: the classes of the actors and the
    names of the tasks it ran, and the modules it imported, from its logs."""
    processes = []
    for session in Path(ray_tmpdir).glob("ray/session_*"):
        if session.is_symlink():
            continue  # session_latest: the same session again
        for out in session.glob("logs/worker-*.out"):
            ran = re.findall(r"^:(?:actor|task)_name:(\S+)$", out.read_text(), re.MULTILINE)
            imported = set(re.findall(r"^import time: .*\| *([\w.]+)$", out.with_suffix(".err").read_text(),
                                      re.MULTILINE))
            processes.append((ran, imported))
    return processes


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto) for the session's tests on S3; its endpoint and credentials are set in the
    environment, so the driver and every subprocess reach it (and Ray's workers: see ray_session)."""
    from s3_server import S3Server

    server = S3Server()
    os.environ.update(server.env)
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def ray_session(request):
    """Each ray.init costs seconds: every test that needs Ray shares this one.

    Only a session that runs tests on S3 starts the S3 server, before Ray: the workers get its
    settings explicitly, as a cluster's nodes have theirs. Serve's ingress is HAProxy, as for
    `fmnist serve`."""
    from fmnist.serve.haproxy import haproxy_ingress

    on_s3 = any("s3_server" in item.fixturenames for item in request.session.items)
    storage_env = request.getfixturevalue("s3_server").env if on_s3 else {}
    if not ray.is_initialized():
        # More CPUs than cores: training workers, scoring actors and Ray Data tasks of a test
        # must all fit at once.
        with haproxy_ingress():
            ray.init(address="local", num_cpus=6, log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": storage_env})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real Fashion-MNIST, found as the product finds it (CI installs the Debian package)."""
    return find_data_dir()


@pytest.fixture(scope="session")
def trained_run(ray_session, real_data_dir, tmp_path_factory):
    """A real 1-epoch, 2-worker training on the real data; returns its TrainResult."""
    from fmnist.core.configs import TrainConfig
    from fmnist.train.trainer import train

    storage = tmp_path_factory.mktemp("runs")
    return train(TrainConfig(epochs=1, num_workers=2, storage_path=str(storage), name="trained",
                             data_dir=str(real_data_dir), seed=0))


@pytest.fixture(scope="session")
def server(ray_session, trained_run) -> str:
    """The application that `fmnist serve` runs, built as `serve run fmnist.serve.app:app checkpoint=C`
    builds it, on the test session's Ray, serving trained_run's best checkpoint; its base URL."""
    from ray import serve

    from fmnist.serve.app import APP_NAME, app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"checkpoint": str(trained_run.best_checkpoint)}), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    """No FMNIST_DATA_DIR and an empty cache, so only explicit paths count."""
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return os.environ


def tensorboard_events(run_dir) -> list:
    """Every event of every TensorBoard event file in ``run_dir``, read raw with TensorBoard's own
    loader (its accumulator would drop a repeated step), file by file in name order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(Path(run_dir).glob("events.out.tfevents.*"))
    return [event for file in files for event in EventFileLoader(str(file)).Load()]


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a run's event files: tag -> [(step, value), ...] in the order written."""
    from tensorboard.util.tensor_util import make_ndarray

    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in tensorboard_events(run_dir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "scalars":  # the loader gives scalars as tensors
                scalars.setdefault(value.tag, []).append((event.step, make_ndarray(value.tensor).item()))
    return scalars


def tensorboard_images(run_dir) -> dict[str, tuple[int, bytes]]:
    """The images of a run's event files: tag -> (step, PNG bytes), the last of each tag."""
    images = {}
    for event in tensorboard_events(run_dir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "images":  # a tensor of width, height, encoded image
                images[value.tag] = (event.step, value.tensor.string_val[2])
    return images
