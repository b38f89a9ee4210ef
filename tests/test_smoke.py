"""The smoke tier: the everyday commands, as a user runs them on their own machine, end to end.

CI runs it on the oldest Ray that pyproject admits, in a venv of its own (`pytest -m smoke`), and
with the rest of the suite on the newest. Each command runs in a process of its own, with no
RAY_ADDRESS: training in local mode, then on 2 workers (an embedded Ray), scoring, evaluating, a
tiny search, and serving."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import ray

from conftest import free_port, interrupt, local_env, pyproject, request, short_ray_tmpdir, start, wait_until

pytestmark = pytest.mark.smoke


def fmnist(*args: str, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fmnist", *args], env=local_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"fmnist {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_train_in_local_mode_and_on_two_workers_then_score_and_evaluate(real_data_dir, tmp_path):
    data = ["--data-dir", str(real_data_dir)]
    fmnist("train", "--epochs", "1", "--storage-path", str(tmp_path), "--name", "local", *data)
    fmnist("train", "--epochs", "1", "--num-workers", "2", "--storage-path", str(tmp_path), "--name", "ddp", *data)
    for run in ("local", "ddp"):
        history = (tmp_path / run / "history.csv").read_text().splitlines()
        assert len(history) == 2 and float(history[1].split(",")[3]) > 0.8, (run, history)

    fmnist("score", "--checkpoint", str(tmp_path / "ddp"), "--output", str(tmp_path / "predictions"), *data)
    assert pq.read_table(tmp_path / "predictions").num_rows == 10_000
    shown = fmnist("evaluate", str(tmp_path / "predictions"), "--json", str(tmp_path / "report.json"))
    assert "Classification report" in shown.stdout
    assert json.loads((tmp_path / "report.json").read_text())["accuracy"] > 0.8


@pytest.mark.slow
def test_a_tiny_search(real_data_dir, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"depth": 1, "width": {"choice": [16, 32]}, "lr": {"loguniform": [1e-4, 0.005]}}))
    done = fmnist("tune", "--trials", "4", "--max-epochs", "3", "--grace-period", "1", "--concurrency", "2",
                  "--validation", "1000", "--space", str(space), "--storage-path", str(tmp_path), "--name", "s",
                  "--data-dir", str(real_data_dir), cwd=tmp_path)
    assert "reproduce it with" in done.stdout
    board = (tmp_path / "s" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 5, board


def test_serve_answers_a_prediction_and_stops_on_ctrl_c(real_data_dir, tmp_path):
    from PIL import Image

    from fmnist.core.data import load_test_split

    fmnist("train", "--epochs", "1", "--storage-path", str(tmp_path), "--name", "run", "--data-dir", str(real_data_dir))
    images, labels = load_test_split(real_data_dir)
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    port = free_port()
    answers = []

    def answered() -> bool:
        try:
            answers.append(request(f"http://127.0.0.1:{port}/predict", png.getvalue(), "image/png", timeout_s=5))
        except OSError:
            return False
        return answers[-1][0] == 200  # before the application is up, the proxy answers 404

    with short_ray_tmpdir() as ray_tmpdir:
        proc = start([sys.executable, "-m", "fmnist", "serve", "--checkpoint", str(tmp_path / "run"),
                      "--port", str(port)], env=local_env(ray_tmpdir))
        wait_until(proc, answered, timeout_s=180, poll_s=0.5)
        output = interrupt(proc, within_s=30)
    assert proc.returncode == 130, output
    answer = answers[-1][1]
    assert answer["label"] == labels[0] and len(answer["probabilities"]) == 10, answers


def test_the_ray_it_runs_on_is_one_pyproject_admits():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    (ray_requirement,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("ray[")]
    assert ray.__version__ in SpecifierSet(str(ray_requirement.specifier)), ray.__version__
