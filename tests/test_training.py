"""Training on Ray Train: a real 2-worker run on the real data, its artifacts, and resuming."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import sys
import time

import psutil
import pytest
import ray
import ray.train
import torch

import fmnist
from fmnist.cli import main
from fmnist.cli import parse_arguments
from fmnist.core.configs import TrainConfig, learning_rate, train_arguments
from fmnist.core.data import load_fashion_mnist
from fmnist.core.errors import InputError
from fmnist.core.model import normalize
from fmnist.train.report import HISTORY_COLUMNS
from fmnist.train.trainer import train

from conftest import (PNG_MAGIC, REPO, break_once_written, interrupt, one_error_line, start, tensorboard_scalars,
                      wait_until)


def read_history(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_two_workers_one_epoch_reaches_80_percent_and_leaves_its_artifacts(trained_run, real_data_dir):
    assert trained_run.best_accuracy >= 0.80
    with open(os.path.join(trained_run.run_dir, "history.csv")) as f:
        assert f.readline().strip() == ",".join(HISTORY_COLUMNS)
    (row,) = read_history(trained_run.run_dir)
    assert row["epoch"] == "1" and float(row["test_accuracy"]) == trained_run.best_accuracy
    assert float(row["samples_per_second"]) == pytest.approx(60_000 / float(row["train_seconds"]))
    with open(os.path.join(trained_run.run_dir, "loss_curve.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC

    # The checkpoint, loaded as a user would, gives exactly the reported test accuracy.
    model = fmnist.load_model(trained_run.run_dir)
    data = load_fashion_mnist(real_data_dir)
    with torch.no_grad():
        predicted = model(normalize(torch.from_numpy(data.test_images), model.config)).argmax(dim=1)
    accuracy = (predicted == torch.from_numpy(data.test_labels)).float().mean().item()
    assert accuracy == pytest.approx(trained_run.best_accuracy, abs=1e-6)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_figures_as_an_uninterrupted_one(ray_session, real_data_dir, tmp_path,
                                                                             capsys):
    storage = str(tmp_path)
    # Started on a placement that is not the default of the resume below (2 workers here): the
    # resume must keep it, or other dropout masks change the figures.
    options = ["--epochs", "3", "--schedule", "cosine", "--num-workers", "1", "--cpus-per-worker", "1", "--seed", "7",
               "--storage-path", storage, "--data-dir", str(real_data_dir)]
    # A real Ctrl-C: a separate process (its own embedded Ray), interrupted once epoch 1 is recorded.
    proc = start([sys.executable, str(REPO / "workflows" / "train.py"), *options, "--name", "cut"])
    history_file = tmp_path / "cut" / "history.csv"
    wait_until(proc, lambda: history_file.exists() and len(read_history(tmp_path / "cut")) >= 1)
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    output = interrupt(proc, within_s=30)
    assert proc.returncode == 130, output
    _, orphans = psutil.wait_procs(ray_processes, timeout=15)
    assert not orphans, f"Ray processes left running: {[p.name() for p in orphans]}"
    assert "--resume" in output
    assert len(read_history(tmp_path / "cut")) < 3

    assert main(["train", "--resume", "--name", "cut", "--storage-path", storage, "--data-dir", str(real_data_dir)]) == 0
    resumed = read_history(tmp_path / "cut")
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]

    handler = signal.getsignal(signal.SIGINT)
    uninterrupted = train(TrainConfig(epochs=3, schedule="cosine", num_workers=1, cpus_per_worker=1, seed=7,
                                      storage_path=storage, name="whole", data_dir=str(real_data_dir)))
    # fit() ran on this (main) thread, where Ray Train would leave its own Ctrl-C handler behind.
    assert signal.getsignal(signal.SIGINT) is handler
    for got, want in zip(resumed, uninterrupted.history):
        for key in ("train_loss", "test_loss", "test_accuracy"):
            assert float(got[key]) == pytest.approx(want[key], rel=1e-5), (got["epoch"], key)

    # A finished run trains on only with more --epochs, and keeps them for its next resume;
    # without --name, --resume takes the run (re)started last.
    # Another placement, asked for, is used, with a note that the figures will differ.
    resume = ["train", "--resume", "--storage-path", storage, "--data-dir", str(real_data_dir)]
    capsys.readouterr()
    assert main([*resume, "--name", "cut"]) == 2
    assert main([*resume, "--name", "cut", "--epochs", "4", "--num-workers", "2"]) == 0
    assert [r["epoch"] for r in read_history(tmp_path / "cut")] == ["1", "2", "3", "4"]
    assert json.loads((tmp_path / "cut" / "train_config.json").read_text())["num_workers"] == 2
    # TensorBoard has each epoch once, over the event files of the three (re)starts.
    accuracy = tensorboard_scalars(tmp_path / "cut")["accuracy/test"]
    assert [step for step, _ in accuracy] == [1, 2, 3, 4]
    assert [value for _, value in accuracy] == pytest.approx(
        [float(r["test_accuracy"]) for r in read_history(tmp_path / "cut")])
    assert main(resume) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"error: --resume: {tmp_path / 'cut'} has finished 3 epochs; pass --epochs N (more than 3) to train it further",
        "note: resuming on another placement than the run started with (num_workers 1 -> 2); its figures will "
        "differ from an uninterrupted run's",
        f"error: --resume: {tmp_path / 'cut'} has finished 4 epochs; pass --epochs N (more than 4) to train it further",
    ]


def test_cosine_schedule_falls_from_lr_towards_zero_over_the_run():
    rates = [learning_rate(0.002, "cosine", epoch, 10) for epoch in range(1, 11)]
    assert rates[0] == 0.002
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert 0 < rates[-1] < 0.0001
    # A run extended to 20 epochs on resume continues on a 20-epoch curve, not on the old one.
    assert learning_rate(0.002, "cosine", 11, 20) > rates[-1]
    assert learning_rate(0.002, "constant", 7, 10) == 0.002


def test_existing_run_is_not_overwritten_and_resume_needs_a_run(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["train", "--storage-path", str(tmp_path), "--name", "taken"]) == 2
    assert main(["train", "--storage-path", str(tmp_path), "--name", "missing", "--resume"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "exists; pass --resume" in lines[0] and "not a run directory" in lines[1]


def test_resuming_a_run_with_a_damaged_config_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train_config.json").write_text("{not json")
    assert main(["train", "--storage-path", str(tmp_path), "--name", "broken", "--resume"]) == 2
    assert "train_config.json is damaged" in one_error_line(capsys)


def test_storage_path_that_is_a_file_exits_2_with_one_line(ray_session, real_data_dir, tmp_path, capsys):
    a_file = tmp_path / "runs"
    a_file.write_text("not a directory")
    # Refused up front, and, one level down, where writing the run's first file fails.
    for storage, words in ((a_file, "is a file"), (a_file / "deeper", "cannot write")):
        assert main(["train", "--storage-path", str(storage), "--data-dir", str(real_data_dir)]) == 2
        assert words in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["runs"] and a_file.read_text() == "not a directory"


@pytest.mark.slow
def test_a_run_directory_that_stops_taking_writes_stops_the_run_with_one_line(ray_session, real_data_dir, tmp_path,
                                                                              capsys):
    history = tmp_path / "broken" / "history.csv"

    free_cpus = ray.available_resources().get("CPU", 0)
    break_once_written(history)  # once epoch 1 is written, history.csv can no longer be replaced
    assert main(["train", "--epochs", "20", "--keep", "20", "--num-workers", "1", "--cpus-per-worker", "1",
                 "--storage-path", str(tmp_path), "--name", "broken", "--data-dir", str(real_data_dir)]) == 2
    assert one_error_line(capsys) == (f"error: cannot write {history} (Is a directory); "
                                      "pass a --storage-path you can write to")
    # The run stopped there: its worker's CPU is free again (one still training would hold it),
    # and its checkpoints are kept for a resume.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < free_cpus:
        assert time.monotonic() < deadline, "the run's worker still holds its CPU"
        time.sleep(0.1)
    checkpoints = [p for p in history.parent.iterdir() if p.name.startswith("checkpoint_")]
    assert 1 <= len(checkpoints) < 20


@pytest.mark.parametrize("options, names", [
    (["--hidden", "256,x"], "--hidden"),
    (["--dropout", "1.5"], "--dropout"),
    (["--epochs", "0"], "--epochs"),
    (["--schedule", "linear"], "--schedule"),
    (["--activation", "tanh"], "--activation"),
    (["--validation", "30001"], "--validation"),
    (["--batch-size", "1", "--num-workers", "2"], "--batch-size 1 is smaller than --num-workers 2"),
    (["--lr", "inf"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--max-failures", "-1"], "--max-failures"),
    (["--name", "é"], "--name 'é' must be a plain directory name"),
    (["--storage-path", "foo://bar"], "storage path foo://bar is not usable"),
    (["--gpus", "1"], "unrecognized arguments: --gpus 1 (see 'fmnist train --help')"),
    (["--augment", "flip,rotate"], "--augment: expected 'none' or a comma-separated list of flip, shift, erase"),
    (["--early-stopping", "3"], "--early-stopping needs --validation"),
    (["--early-stopping", "-1", "--validation", "100"], "--early-stopping"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, options, names):
    assert main(["train", "--storage-path", str(tmp_path), *options]) == 2
    assert names in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_config_turns_into_the_train_command_that_gives_it_back_and_refuses_what_the_command_line_refuses():
    config = TrainConfig(
        epochs=7, lr=0.00123, batch_size=300, hidden=(512, 16), activation="silu", dropout=0.35, weight_decay=1e-05,
        label_smoothing=0.05, schedule="cosine", seed=42, validation=5000, augment=("flip", "erase"),
        early_stopping=4, num_workers=3, use_gpu=False, cpus_per_worker=2, storage_path="s3://bucket/runs",
        name="r1", resume=True, data_dir="/data", keep=5, max_failures=0, resource_timeout_s=12.5, verbose=True,
        mlflow="")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    args = parse_arguments(["train", *train_arguments(config, fields)])
    assert TrainConfig(**{f: getattr(args, f) for f in fields}) == config
    assert train_arguments(TrainConfig(), ["augment", "use_gpu", "resume", "epochs"]) == ["--augment", "none"]

    for field, value in [("lr", 0), ("dropout", 1.0), ("epochs", 2.5), ("hidden", ()), ("augment", ("rotate",)),
                         ("activation", "tanh"), ("seed", -1), ("resource_timeout_s", float("nan"))]:
        option = "--resource-timeout" if field == "resource_timeout_s" else "--" + field.replace("_", "-")
        with pytest.raises(InputError, match=f"^{option}: expected"):
            TrainConfig(**{field: value})
