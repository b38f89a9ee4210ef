"""--validation and --activation on a real run: exact validation figures on held-out training images,
checkpoints chosen on them, and the activation carried through the checkpoint into scoring."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import fmnist
from conftest import assert_same_classes
from fmnist.cli import main
from fmnist.core.checkpoints import METRICS_FILE, resolve_checkpoint
from fmnist.core.configs import TrainConfig
from fmnist.core.data import load_fashion_mnist, validation_split
from fmnist.core.model import normalize
from fmnist.train.report import HISTORY_COLUMNS, VALIDATION_COLUMNS
from fmnist.train.trainer import train

from test_training import read_history

HELD_OUT, SEED = 1000, 3


@pytest.fixture(scope="module")
def data(real_data_dir):
    return load_fashion_mnist(real_data_dir)


@pytest.fixture(scope="module")
def validated_run(ray_session, real_data_dir, tmp_path_factory):
    """A real 2-epoch, 2-worker run holding out 1,000 images, with GELU."""
    storage = tmp_path_factory.mktemp("validated")
    return train(TrainConfig(epochs=2, num_workers=2, cpus_per_worker=1, hidden=(64,), activation="gelu",
                             validation=HELD_OUT, seed=SEED, keep=1, storage_path=str(storage), name="v",
                             data_dir=str(real_data_dir)))


def test_the_held_out_images_are_class_balanced_disjoint_and_fixed_by_the_seed(data):
    kept, held_out = validation_split(data.train_labels, HELD_OUT, SEED)
    assert len(held_out) == HELD_OUT and len(kept) == 60_000 - HELD_OUT
    assert not set(kept) & set(held_out)
    assert np.bincount(data.train_labels[held_out], minlength=10).tolist() == [100] * 10
    assert np.array_equal(validation_split(data.train_labels, HELD_OUT, SEED)[1], held_out)
    assert not np.array_equal(validation_split(data.train_labels, HELD_OUT, SEED + 1)[1], held_out)
    assert np.bincount(data.train_labels[validation_split(data.train_labels, 1005, 0)[1]]).tolist() == \
        [101] * 5 + [100] * 5


@pytest.mark.slow
def test_validation_figures_are_exact_and_the_best_checkpoint_is_chosen_on_them(validated_run, data):
    history = read_history(validated_run.run_dir)
    with open(f"{validated_run.run_dir}/history.csv") as f:
        assert f.readline().strip().split(",") == [*HISTORY_COLUMNS, *VALIDATION_COLUMNS]
    # The workers trained on the 59,000 images left, not on the held-out ones.
    for row in history:
        assert float(row["samples_per_second"]) * float(row["train_seconds"]) == pytest.approx(59_000)

    best = max(history, key=lambda r: (float(r["val_accuracy"]), int(r["epoch"])))
    checkpoint = resolve_checkpoint(validated_run.run_dir)
    assert json.loads(checkpoint.read_text(METRICS_FILE))["epoch"] == int(best["epoch"])
    assert validated_run.best_accuracy == pytest.approx(float(best["test_accuracy"]))

    # A plain CPU forward pass of that checkpoint over the held-out images gives the reported figures.
    _, held_out = validation_split(data.train_labels, HELD_OUT, SEED)
    model = fmnist.load_model(validated_run.run_dir)
    with torch.no_grad():
        log_probs = model(normalize(torch.from_numpy(data.train_images[held_out]), model.config))
    labels = torch.from_numpy(data.train_labels[held_out])
    assert F.nll_loss(log_probs, labels).item() == pytest.approx(float(best["val_loss"]), rel=1e-5)
    assert (log_probs.argmax(dim=1) == labels).double().mean().item() == pytest.approx(float(best["val_accuracy"]),
                                                                                      abs=1e-9)


@pytest.mark.slow
def test_the_activation_round_trips_through_the_checkpoint_into_score(validated_run, data, real_data_dir, tmp_path):
    model = fmnist.load_model(validated_run.run_dir)
    assert model.config.activation == "gelu" and model.activation is F.gelu
    assert main(["score", "--checkpoint", validated_run.run_dir, "--output", str(tmp_path / "p"),
                 "--data-dir", str(real_data_dir)]) == 0
    predictions = pq.read_table(tmp_path / "p").sort_by("id")
    with torch.no_grad():
        reference = model(normalize(torch.from_numpy(data.test_images), model.config)).numpy()
    assert_same_classes(predictions["prediction"].to_numpy(), reference)
    expected = reference.argmax(axis=1)
    assert (expected == data.test_labels).mean() == pytest.approx(validated_run.best_accuracy, abs=1e-9)


@pytest.mark.slow
def test_a_resume_keeps_the_validation_split_and_the_activation(validated_run, real_data_dir):
    run_dir = validated_run.run_dir
    saved = json.loads(open(f"{run_dir}/train_config.json").read())
    assert saved["validation"] == HELD_OUT and saved["activation"] == "gelu"
    assert main(["train", "--resume", "--storage-path", str(run_dir.rsplit("/", 1)[0]), "--name", "v",
                 "--epochs", "3", "--cpus-per-worker", "1", "--data-dir", str(real_data_dir)]) == 0
    history = read_history(run_dir)
    assert [r["epoch"] for r in history] == ["1", "2", "3"] and history[2]["val_accuracy"]
    saved = json.loads(open(f"{run_dir}/train_config.json").read())
    assert saved["validation"] == HELD_OUT and saved["activation"] == "gelu" and saved["epochs"] == 3
