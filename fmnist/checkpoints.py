"""Checkpoint directories: what is in one, and how to find and load the best of a run.

A checkpoint directory holds
  model.pt            the model's state dict
  model_config.json   ModelConfig: enough to rebuild the model without the training options
  metrics.json        the epoch's figures (epoch, train_loss, test_loss, test_accuracy, ...)
  training_state.pt   what resuming needs: optimizer, epoch, seed, history
A run directory holds Ray Train's ``checkpoint_*`` directories; "the run" means its best one by
validation accuracy when it was trained with --validation, and otherwise its last: nothing is
chosen on the test set, which is kept for the figures reported.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from fmnist.errors import InputError
from fmnist.model import Classifier, ModelConfig
from fmnist.storage import StoragePath, is_uri

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "training_state.pt"


def save_checkpoint(
    directory: Path, model: torch.nn.Module, config: ModelConfig, metrics: dict, training_state: dict
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    torch.save(training_state, directory / STATE_FILE)


def load_training_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def best_checkpoint(run_dir: StoragePath) -> StoragePath | None:
    """The run's checkpoint with the highest validation accuracy (the later epoch wins a tie), or
    its last one for a run without a validation split."""
    scored = []
    for name in run_dir.subdirectories():
        if not name.startswith("checkpoint_"):
            continue
        try:
            m = json.loads(run_dir.child(name).read_text(METRICS_FILE))
            scored.append((m.get("val_accuracy", 0.0), m["epoch"], name))
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written, or not ours: not a candidate
    return run_dir.child(max(scored)[2]) if scored else None


def resolve_checkpoint(path: str | os.PathLike) -> StoragePath:
    """A checkpoint directory as given, or a run directory's best checkpoint (local or a URI)."""
    location = StoragePath.parse(str(path))
    if not location.exists():
        raise InputError(f"checkpoint {location.uri} does not exist; pass a checkpoint or run directory")
    if location.is_file():
        raise InputError(f"checkpoint {location.uri} is a file; pass a checkpoint or run directory")
    checkpoint = location if location.child(MODEL_FILE).exists() else best_checkpoint(location)
    if checkpoint is None:
        raise InputError(
            f"{location.uri} is neither a checkpoint directory (no {MODEL_FILE}) nor a run directory with checkpoints"
        )
    return checkpoint


def load_model(path: str | os.PathLike) -> Classifier:
    """The eval-mode model (CPU) of a checkpoint directory or of a run directory's best checkpoint."""
    return load_checkpoint(resolve_checkpoint(path))


def load_checkpoint(checkpoint: StoragePath) -> Classifier:
    """The eval-mode model (CPU) of a checkpoint directory; one on object storage is fetched first."""
    if not is_uri(checkpoint.uri):
        return _load_directory(Path(checkpoint.path), checkpoint.uri)
    with tempfile.TemporaryDirectory(prefix="fmnist-checkpoint-") as local:
        pafs.copy_files(checkpoint.path, local, source_filesystem=checkpoint.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return _load_directory(Path(local), checkpoint.uri)


def _load_directory(directory: Path, shown: str) -> Classifier:
    """The model in a local checkpoint ``directory``; errors name it as ``shown``."""
    try:
        config = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint {shown} has a missing or bad {CONFIG_FILE} ({e})") from None
    model = Classifier(config)
    try:
        state = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    except OSError as e:
        raise InputError(f"checkpoint {shown}: cannot read {MODEL_FILE} ({e.strerror or e})") from None
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError):  # not written by torch.save, or damaged
        raise InputError(f"checkpoint {shown}: {MODEL_FILE} is not a saved model (damaged, or not ours)") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # not a state dict, or weights that do not fit
        lines = [line.strip() for line in str(e).strip().splitlines()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # torch's first line is only a heading
        raise InputError(f"checkpoint {shown}: {MODEL_FILE} does not fit the model of {CONFIG_FILE} "
                         f"({detail})") from None
    return model.eval()
