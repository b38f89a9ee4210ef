"""fmnist tune: real searches (tiny networks, real data, real Ray Tune and Ray Train), their files,
interruption and resumption, a failing trial, and bad input."""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys

import pytest
from mlflow.tracking import MlflowClient

from fmnist.cli import main

from conftest import REPO, interrupt, one_error_line, short_ray_tmpdir, start, wait_until, worker_processes

TINY_SPACE = {"depth": 1, "width": {"choice": [16, 32]}, "lr": {"loguniform": [1e-5, 0.005]},
              "augment": {"choice": ["none", "flip,shift"]}, "early_stopping": 2}
SEARCH = ["--max-epochs", "3", "--grace-period", "1", "--workers-per-trial", "1", "--concurrency", "2",
          "--validation", "1000", "--no-gpu"]


def tune(*args: str, interrupt_when=None, cwd=None, ray_tmpdir=None) -> tuple[int, str]:
    """``workflows/tune.py`` in its own process (its own embedded Ray, as a user runs it, with its
    session under ``ray_tmpdir`` if given); with ``interrupt_when``, a Ctrl-C as soon as that returns
    True. Its exit status and output."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir} if ray_tmpdir else None
    proc = start([sys.executable, str(REPO / "workflows" / "tune.py"), *args], cwd=cwd, env=env)
    if interrupt_when is not None:
        wait_until(proc, interrupt_when, timeout_s=300, poll_s=0.2)
        output = interrupt(proc, within_s=45)
        return proc.returncode, output
    output, _ = proc.communicate(timeout=900)
    return proc.returncode, output


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def write_space(path, space: dict):
    path.write_text(json.dumps(space))
    return str(path)


@pytest.fixture(scope="module")
def search(real_data_dir, tmp_path_factory):
    """A small real search: 4 trials of tiny networks, 3 epochs, 1 worker each, 2 at a time. Its
    directory, its output, and the actors its Ray session started."""
    storage = tmp_path_factory.mktemp("searches")
    space = write_space(storage / "space.json", TINY_SPACE)
    with short_ray_tmpdir() as session_dir:
        # Each trial also logs to a real MLflow store (and MLflow's artifacts go where the search ran).
        code, output = tune("--trials", "4", *SEARCH, "--space", space, "--seed", "1", "--storage-path",
                            str(storage), "--name", "s", "--data-dir", str(real_data_dir),
                            "--mlflow", f"sqlite:///{storage / 'mlflow.db'}", cwd=storage, ray_tmpdir=session_dir)
        actors = [ran[0] for ran, _ in worker_processes(session_dir) if ran]
    assert code == 0, output
    return storage / "s", output, actors


@pytest.mark.slow
def test_a_search_finishes_stops_poor_trials_early_and_ranks_on_the_trials_own_histories(search):
    search_dir, output, actors = search
    board = read_csv(search_dir / "leaderboard.csv")
    assert len(board) == 4
    assert {row["status"] for row in board} <= {"finished", "stopped early"}
    assert any(row["status"] == "stopped early" for row in board), board  # ASHA stopped one
    for row in board:
        history = read_csv(search_dir / f"trial_{row['trial']}" / "history.csv")
        assert int(row["epochs"]) == len(history) and row["run_dir"] == str(search_dir / f"trial_{row['trial']}")
        assert (row["status"] == "finished") == (len(history) == 3)
        best = max(history, key=lambda r: (float(r["val_accuracy"]), int(r["epoch"])))
        assert float(row["val_accuracy"]) == pytest.approx(float(best["val_accuracy"]), abs=1e-4)
        assert int(row["best_epoch"]) == int(best["epoch"])
    assert [float(r["val_accuracy"]) for r in board] == sorted((float(r["val_accuracy"]) for r in board),
                                                               reverse=True)

    # MLflow has one run per trial, named as its run directory, with every epoch the trial reached.
    client = MlflowClient(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("fmnist").experiment_id])}
    assert set(runs) == {f"trial_{row['trial']}" for row in board}
    for row in board:
        history = read_csv(search_dir / f"trial_{row['trial']}" / "history.csv")
        logged = client.get_metric_history(runs[f"trial_{row['trial']}"].info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in logged] == [(int(h["epoch"]), float(h["val_accuracy"])) for h in history]
    best = json.loads((search_dir / "best_config.json").read_text())
    assert best["trial"] == board[0]["trial"] and best["val_accuracy"] == pytest.approx(float(board[0]["val_accuracy"]),
                                                                                        abs=1e-4)
    assert best["train_command"] in output.replace("\n  ", " ")  # printed as it is saved
    assert "Top 4 of 4 trials" in output and "reproduce it with" in output
    assert "worker processes have been started" not in output, output
    # On one's own machine each trial trains in Ray Train's local mode, in its own process: no
    # controller, no workers, no placement group to leave behind when Tune stops it.
    assert actors.count("ImplicitFunc") == 4, actors
    assert not set(actors) & {"TrainController", "RayTrainWorker", "PlacementGroupCleaner"}, actors
    for tune_state in ("tuner.pkl", "search_config.json"):
        assert (search_dir / tune_state).exists()


@pytest.mark.slow
def test_the_printed_train_command_reproduces_the_best_trial_and_score_takes_a_trial_run(
        search, ray_session, real_data_dir, tmp_path):
    search_dir, _, _ = search
    best = json.loads((search_dir / "best_config.json").read_text())
    command = shlex.split(best["train_command"])
    assert command[:2] == ["fmnist", "train"]
    assert main([*command[1:], "--storage-path", str(tmp_path), "--name", "again", "--cpus-per-worker", "1",
                 "--data-dir", str(real_data_dir)]) == 0
    trial = read_csv(search_dir / f"trial_{best['trial']}" / "history.csv")
    again = read_csv(tmp_path / "again" / "history.csv")
    assert len(again) == 3
    for got, want in zip(again, trial):  # a trial ASHA stopped reproduces up to where it stopped
        for key in ("train_loss", "val_loss", "val_accuracy", "test_accuracy"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), (got["epoch"], key)

    assert main(["score", "--checkpoint", best["run_dir"], "--output", str(tmp_path / "p"),
                 "--data-dir", str(real_data_dir)]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "p").num_rows == 10_000


@pytest.mark.slow
def test_confirm_retrains_the_best_recipe_on_the_full_training_set_and_a_resume_keeps_finished_confirm_runs(
        search, real_data_dir):
    search_dir, _, _ = search
    again = ["--resume", "--name", "s", "--storage-path", str(search_dir.parent), "--data-dir", str(real_data_dir)]
    code, output = tune(*again, "--confirm", "1", cwd=search_dir.parent)
    assert code == 0, output
    first = read_csv(search_dir / "confirm_seed1" / "history.csv")  # the search's --seed is 1
    assert len(first) == 3 and not first[-1].get("val_accuracy")  # no validation split: the full training set
    assert f"test accuracy {100 * float(first[-1]['test_accuracy']):.2f}% ± 0.00" in output

    code, output = tune(*again, "--confirm", "2", cwd=search_dir.parent)
    assert code == 0, output
    assert "confirm_seed1: finished before, 3 epochs" in output.replace("\n", "")
    assert read_csv(search_dir / "confirm_seed1" / "history.csv") == first  # kept, not trained again
    second = read_csv(search_dir / "confirm_seed2" / "history.csv")
    assert len(second) == 3
    mean = (float(first[-1]["test_accuracy"]) + float(second[-1]["test_accuracy"])) / 2
    assert f"test accuracy {100 * mean:.2f}%" in output


@pytest.mark.slow
def test_ctrl_c_then_resume_finishes_the_search_and_a_trial_with_an_impossible_recipe_fails_alone(
        real_data_dir, tmp_path):
    # Dropout 1.5 cannot be trained: such trials fail (as `fmnist train --dropout 1.5` would refuse
    # it), the others go on. Seed 2 draws 1.5, 0.1, 0.1.
    space = write_space(tmp_path / "space.json", {"depth": 1, "width": 16, "dropout": {"choice": [0.1, 1.5]}})
    options = ["--trials", "3", "--max-epochs", "1", "--grace-period", "1", "--concurrency", "1", "--validation",
               "1000", "--seed", "2", "--space", space, "--storage-path", str(tmp_path), "--name", "cut",
               "--data-dir", str(real_data_dir)]
    search_dir = tmp_path / "cut"

    def a_trial_done_and_the_next_running() -> bool:
        # Tune marks the trials it was running "terminated" when interrupted: this one must still resume.
        runs = list(search_dir.glob("trial_*"))
        done = any(len(read_csv(h)) == 1 for h in search_dir.glob("trial_*/history.csv"))
        return done and any((r / "train_config.json").exists() and not (r / "history.csv").exists() for r in runs)

    code, output = tune(*options, interrupt_when=a_trial_done_and_the_next_running)
    assert code == 130, output
    assert f"fmnist tune --resume --storage-path {tmp_path} --name cut" in output
    done = {h: h.stat().st_mtime_ns for h in search_dir.glob("trial_*/history.csv") if len(read_csv(h)) == 1}

    code, output = tune("--resume", "--storage-path", str(tmp_path), "--name", "cut",
                        "--data-dir", str(real_data_dir))
    assert code == 0, output
    board = read_csv(search_dir / "leaderboard.csv")
    assert len(board) == 3
    assert {h: h.stat().st_mtime_ns for h in done} == done  # not trained again
    failed = [row for row in board if row["status"] == "failed"]
    assert failed and len(failed) < len(board), board
    for row in failed:
        assert row["dropout"] == "1.5" and "--dropout" in row["error"] and row["epochs"] == "0"
    assert all(row["status"] == "finished" and row["dropout"] == "0.1" for row in board if row not in failed)


@pytest.mark.parametrize("space, options, message", [
    (None, ["--space", "/nonexistent/space.json"], "cannot read it"),
    ("{not json", [], "is not JSON"),
    (json.dumps({"learning_rate": {"choice": [0.1]}}), [], "unknown option 'learning_rate'"),
    (json.dumps({"lr": {"normal": [0, 1]}}), [], "lr must be a float or one of"),
    (json.dumps({"lr": {"loguniform": [0, 0.1]}}), [], "loguniform needs [low, high]"),
    (json.dumps({"activation": {"choice": []}}), [], "choice needs a non-empty list"),
    (json.dumps({"lr": 0.001, "dropout": {"choice": [0.2]}}), [], "has nothing to search"),
    (json.dumps({"augment": {"choice": ["flip", "flip,rotate"]}}), [], "augment: expected 'none' or a comma-separated"),
    (json.dumps({"depth": {"int": [1, 3]}}), ["--architecture", "256,128,64"], "nothing to search (with the network"),
    (None, ["--trials", "0"], "--trials"),
    (None, ["--max-epochs", "1", "--grace-period", "2"], "below ASHA's grace period"),
    (None, ["--validation", "0"], "--validation"),
    (None, ["--resume", "--name", "nothing"], "not a search directory"),
])
def test_bad_input_is_one_error_line_and_makes_nothing(tmp_path, capsys, space, options, message):
    storage = tmp_path / "searches"
    if space is not None:
        (tmp_path / "space.json").write_text(space)
        options = ["--space", str(tmp_path / "space.json"), *options]
    assert main(["tune", "--storage-path", str(storage), *options]) == 2
    assert message in one_error_line(capsys)
    assert not storage.exists()  # refused before anything was made


def test_ray_still_refuses_ray_train_in_a_tune_trial_even_in_local_mode(ray_session, tmp_path):
    # Why fmnist.train.trainer._fit_locally calls the training loop itself in a search's trial: Ray refuses
    # ray.train.* in a Tune function, Ray Train's local mode included (ray-project/ray#49454). Once
    # this fails, Ray lets it run: the trial can use local mode as `fmnist train` does, and the shim goes.
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer

    def trial(config):
        def loop():
            ray.train.report({"rank": ray.train.get_context().get_world_rank()})

        TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=0)).fit()
        ray.tune.report({"done": 1})

    tuner = ray.tune.Tuner(trial, run_config=ray.tune.RunConfig(storage_path=str(tmp_path), name="shim", verbose=0))
    (result,) = tuner.fit()
    assert "deprecated when running in a function passed to Ray Tune" in str(result.error)


@pytest.mark.slow
def test_a_search_on_object_storage_keeps_everything_in_the_bucket_and_resumes_from_it(
        s3_server, bucket, real_data_dir, tmp_path):
    # A cluster's search: trials, Tune's state, the leaderboard and --confirm's runs in the bucket.
    space = write_space(tmp_path / "space.json", {"depth": 1, "width": 16, "lr": {"loguniform": [1e-4, 0.005]}})
    storage = f"s3://{bucket}/searches"
    options = ["--storage-path", storage, "--name", "remote", "--data-dir", str(real_data_dir)]
    code, output = tune("--trials", "2", "--max-epochs", "2", "--grace-period", "1", "--workers-per-trial", "1",
                        "--concurrency", "2", "--validation", "1000", "--no-gpu", "--space", space, *options,
                        cwd=tmp_path)
    assert code == 0, output
    keys = set(s3_server.keys(bucket, "searches/remote/"))
    board = list(csv.DictReader(s3_server.get(bucket, "searches/remote/leaderboard.csv").decode().splitlines()))
    assert len(board) == 2 and {row["status"] for row in board} <= {"finished", "stopped early"}
    for row in board:
        assert row["run_dir"] == f"{storage}/remote/trial_{row['trial']}"
        assert f"searches/remote/trial_{row['trial']}/history.csv" in keys
    assert {f"searches/remote/{name}" for name in ("best_config.json", "search_config.json", "tuner.pkl")} <= keys
    assert [p.name for p in tmp_path.iterdir()] == ["space.json"]  # nothing of the search written here

    code, output = tune("--resume", "--confirm", "1", *options, cwd=tmp_path)
    assert code == 0, output
    assert "searches/remote/confirm_seed0/history.csv" in s3_server.keys(bucket, "searches/remote/confirm_seed0/")
