"""Checkpoint directories: what is in one, and how to find and load the best of a run.

A checkpoint directory holds
  model.pt            the model's state dict
  model_config.json   ModelConfig: enough to rebuild the model without the training options
  metrics.json        the epoch's figures (epoch, train_loss, test_loss, test_accuracy, ...)
  training_state.pt   what resuming needs: optimizer, scheduler, epoch, RNG state, history
A run directory holds Ray Train's ``checkpoint_*`` directories; "the run" means its best one
by test accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fmnist.errors import InputError
from fmnist.model import Classifier, ModelConfig

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
    # weights_only=False: the state holds Python RNG state and the history, written by us.
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


def read_metrics(directory: Path) -> dict[str, Any]:
    return json.loads((directory / METRICS_FILE).read_text())


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / MODEL_FILE).is_file())


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest test accuracy; the later epoch wins a tie."""
    scored = []
    for ckpt in list_checkpoints(run_dir):
        try:
            m = read_metrics(ckpt)
            scored.append((m["test_accuracy"], m["epoch"], ckpt))
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written, or not ours: not a candidate
    return max(scored)[2] if scored else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or a run directory's best checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist; pass a checkpoint or run directory")
    if (path / MODEL_FILE).is_file():
        return path
    best = best_checkpoint(path) if path.is_dir() else None
    if best is None:
        raise InputError(
            f"{path} is neither a checkpoint directory (no {MODEL_FILE}) nor a run directory with checkpoints"
        )
    return best


def load_model_config(checkpoint: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads((checkpoint / CONFIG_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint {checkpoint} has a missing or bad {CONFIG_FILE} ({e})") from None


def load_model(path: str | os.PathLike) -> Classifier:
    """The eval-mode model (CPU) of a checkpoint directory or of a run directory's best checkpoint."""
    checkpoint = resolve_checkpoint(path)
    config = load_model_config(checkpoint)
    model = Classifier(config)
    try:
        state = torch.load(checkpoint / MODEL_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except RuntimeError as e:  # both "corrupt file" and "does not match the config" land here
        first_line = str(e).strip().splitlines()[0]
        raise InputError(
            f"checkpoint {checkpoint}: {MODEL_FILE} cannot be loaded into the model of {CONFIG_FILE} ({first_line})"
        ) from None
    except (OSError, EOFError) as e:
        raise InputError(f"checkpoint {checkpoint}: cannot read {MODEL_FILE} ({e})") from None
    return model.eval()
