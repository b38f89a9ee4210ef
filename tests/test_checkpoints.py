"""Finding a run's best checkpoint, locally and on URI storage, and loading it."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import fmnist
from fmnist.core.checkpoints import LEGACY_MODEL_FILE, MODEL_FILE, resolve_checkpoint, save_checkpoint
from fmnist.core.errors import InputError
from fmnist.core.model import Classifier, ModelConfig


def _run_directory(directory: Path, validated: bool) -> Path:
    """Three checkpoints: epoch 2 has the best validation accuracy, epoch 1 the best test accuracy."""
    config = ModelConfig(hidden=(16,))
    for epoch, test_accuracy, val_accuracy in ((1, 0.9, 0.5), (2, 0.8, 0.8), (3, 0.7, 0.7)):
        torch.manual_seed(epoch)
        metrics = {"epoch": epoch, "test_accuracy": test_accuracy}
        if validated:
            metrics["val_accuracy"] = val_accuracy
        save_checkpoint(directory / f"checkpoint_{epoch}", Classifier(config), config, metrics, {"epoch": epoch})
    (directory / "history.csv").write_text("")
    return directory


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return _run_directory(tmp_path, validated=True)


def test_a_run_directory_means_its_best_checkpoint_by_validation_accuracy(run_dir):
    assert resolve_checkpoint(run_dir).uri == str(run_dir / "checkpoint_2")
    assert resolve_checkpoint(run_dir / "checkpoint_3").uri == str(run_dir / "checkpoint_3")


def test_without_a_validation_split_a_run_directory_means_its_last_checkpoint(tmp_path):
    # Never the best by test accuracy (epoch 1 here): that would flatter the test figures.
    assert resolve_checkpoint(_run_directory(tmp_path, validated=False)).uri == str(tmp_path / "checkpoint_3")


def test_a_checkpoint_on_uri_storage_is_fetched_and_loads_the_same_model(run_dir, tmp_path_factory, monkeypatch):
    assert resolve_checkpoint(f"file://{run_dir}").uri == f"file://{run_dir}/checkpoint_2"
    fetched_into = tmp_path_factory.mktemp("tmp")
    monkeypatch.setenv("TMPDIR", str(fetched_into))
    monkeypatch.setattr(tempfile, "tempdir", None)  # so that tempfile reads TMPDIR again
    x = torch.randn(3, 784)
    assert torch.equal(fmnist.load_model(f"file://{run_dir}")(x), fmnist.load_model(run_dir)(x))
    assert list(fetched_into.iterdir()) == []  # the fetched copy is not left behind


def test_paths_that_hold_no_checkpoint_are_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(InputError, match="neither a checkpoint directory"):
        resolve_checkpoint(tmp_path)


def test_the_weights_are_safetensors_that_numpy_reads_as_torch_does(tmp_path):
    # Scoring on CPUs reads model.safetensors without torch: the same numbers, name by name.
    from safetensors.numpy import load_file

    config = ModelConfig(hidden=(32, 16), activation="gelu", class_names=("a", "b", "c"))
    torch.manual_seed(0)
    model = Classifier(config).eval()
    save_checkpoint(tmp_path, model, config, {"epoch": 1}, {"epoch": 1})
    got = load_file(tmp_path / MODEL_FILE)
    expected = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], tensor.numpy()), name
    x = torch.randn(5, 784)
    assert torch.equal(fmnist.load_model(tmp_path)(x), model(x))


def test_a_run_of_model_pt_checkpoints_from_before_safetensors_scores_the_same_and_resumes(
        ray_session, real_data_dir, tmp_path):
    from safetensors.torch import load_file

    from fmnist.cli import main
    from fmnist.core.configs import TrainConfig
    from fmnist.train.trainer import train

    train(TrainConfig(epochs=1, hidden=(32,), storage_path=str(tmp_path), name="new", data_dir=str(real_data_dir)),
          local_mode=True)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    for checkpoint in (tmp_path / "old").glob("checkpoint_*"):  # as the code before safetensors wrote them
        torch.save(load_file(checkpoint / MODEL_FILE), checkpoint / LEGACY_MODEL_FILE)
        (checkpoint / MODEL_FILE).unlink()
    x = torch.randn(5, 784)
    assert torch.equal(fmnist.load_model(tmp_path / "old")(x), fmnist.load_model(tmp_path / "new")(x))
    for run in ("new", "old"):
        assert main(["score", "--checkpoint", str(tmp_path / run), "--output", str(tmp_path / f"p-{run}"),
                     "--data-dir", str(real_data_dir)]) == 0
    new, old = (pq.read_table(tmp_path / f"p-{run}").sort_by("id") for run in ("new", "old"))
    assert new["prediction"].equals(old["prediction"]) and new["probabilities"].equals(old["probabilities"])

    resumed = train(TrainConfig(epochs=2, storage_path=str(tmp_path), name="old", resume=True,
                                data_dir=str(real_data_dir)), local_mode=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2]
