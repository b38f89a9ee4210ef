"""Checkpoint directories: what is in one, and how to find and load the best of a run.

A checkpoint directory holds
  model.safetensors   the model's weights (checkpoints from before it hold model.pt, torch.save's file)
  model_config.json   ModelConfig: enough to rebuild the model without the training options
  training_state.pt   what resuming needs: optimizer, epoch, seed, history
  metrics.json        the epoch's figures (epoch, train_loss, test_loss, test_accuracy, ...), written last
A run directory holds ``checkpoint_*`` directories; "the run" means its best one by validation
accuracy when it was trained with --validation, and otherwise its last: nothing is chosen on the
test set, which is kept for the figures reported. A directory without metrics.json is one being
written (or cut short): it is no candidate.

model.safetensors is read with safetensors.numpy: scoring on CPUs never imports torch (1.5 s of a
process's start). An older model.pt is read with torch.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist.core.errors import InputError
from fmnist.core.model_config import ModelConfig
from fmnist.core.numpy_model import NumpyClassifier
from fmnist.core.storage import StoragePath, is_uri

if TYPE_CHECKING:
    import torch

    from fmnist.core.model import Classifier

MODEL_FILE = "model.safetensors"
LEGACY_MODEL_FILE = "model.pt"  # checkpoints written before model.safetensors
CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "training_state.pt"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name() -> str:
    """A new checkpoint directory's name, as Ray Train names its own: checkpoint_<date>_<time>."""
    return datetime.now().strftime(CHECKPOINT_PREFIX + "%Y-%m-%d_%H-%M-%S.%f")


def save_checkpoint(
    directory: StoragePath | str | os.PathLike, model: torch.nn.Module, config: ModelConfig, metrics: dict,
    training_state: dict,
) -> None:
    """Write a checkpoint into ``directory`` (local or object storage), metrics.json last: a directory
    cut short by a kill is no candidate for best_checkpoint or a resume."""
    import torch
    from safetensors.torch import save

    if not isinstance(directory, StoragePath):
        directory = StoragePath.parse(str(directory))
    state = io.BytesIO()
    torch.save(training_state, state)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    directory.child(MODEL_FILE).write_whole(save(weights))
    directory.child(CONFIG_FILE).write_whole(json.dumps(config.to_dict(), indent=2).encode())
    directory.child(STATE_FILE).write_whole(state.getvalue())
    directory.child(METRICS_FILE).write_whole(json.dumps(metrics, indent=2).encode())


def load_training_state(directory: Path) -> tuple[dict, dict[str, Any]]:
    """The model's state dict (torch tensors) and the training state of a local checkpoint directory."""
    import torch
    from safetensors.torch import load_file

    weights_file = _weights_file(directory)
    if weights_file.name == MODEL_FILE:
        weights = load_file(weights_file)
    else:
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)
    return weights, torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def _weights_file(directory: Path) -> Path:
    """A local checkpoint directory's weights: model.safetensors, or an older checkpoint's model.pt."""
    legacy = directory / LEGACY_MODEL_FILE
    return legacy if legacy.exists() and not (directory / MODEL_FILE).exists() else directory / MODEL_FILE


def latest_checkpoint(run_dir: StoragePath) -> StoragePath | None:
    """The run's checkpoint of its latest epoch: where a resume continues from."""
    return _pick(run_dir, lambda metrics, name: (metrics["epoch"], name))


def best_checkpoint(run_dir: StoragePath) -> StoragePath | None:
    """The run's checkpoint with the highest validation accuracy (the later epoch wins a tie), or
    its last one for a run without a validation split."""
    return _pick(run_dir, lambda metrics, name: (metrics.get("val_accuracy", 0.0), metrics["epoch"], name))


def checkpoint_metrics(run_dir: StoragePath) -> dict[str, dict]:
    """The metrics of each whole checkpoint of a run directory, by its name."""
    found = {}
    for name in run_dir.subdirectories():
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            found[name] = json.loads(run_dir.child(name).read_text(METRICS_FILE))
        except (OSError, ValueError):
            continue  # a checkpoint being written, or not ours: not a candidate
    return found


def _pick(run_dir: StoragePath, key) -> StoragePath | None:
    scored = []
    for name, metrics in checkpoint_metrics(run_dir).items():
        try:
            scored.append((key(metrics, name), name))
        except (KeyError, TypeError):
            continue
    return run_dir.child(max(scored)[1]) if scored else None


def resolve_checkpoint(path: str | os.PathLike) -> StoragePath:
    """A checkpoint directory as given, or a run directory's best checkpoint (local or a URI)."""
    location = StoragePath.parse(str(path))
    if not location.exists():
        raise InputError(f"checkpoint {location.uri} does not exist; pass a checkpoint or run directory")
    if location.is_file():
        raise InputError(f"checkpoint {location.uri} is a file; pass a checkpoint or run directory")
    is_checkpoint = location.child(MODEL_FILE).exists() or location.child(LEGACY_MODEL_FILE).exists()
    checkpoint = location if is_checkpoint else best_checkpoint(location)
    if checkpoint is None:
        raise InputError(
            f"{location.uri} is neither a checkpoint directory (no {MODEL_FILE}) nor a run directory with checkpoints"
        )
    return checkpoint


def load_model(path: str | os.PathLike) -> Classifier:
    """The eval-mode model (CPU) of a checkpoint directory or of a run directory's best checkpoint."""
    return load_checkpoint(resolve_checkpoint(path))


def load_checkpoint(checkpoint: StoragePath) -> Classifier:
    """The eval-mode torch model (CPU) of a checkpoint directory."""
    from fmnist.core.model import Classifier

    return Classifier.from_numpy(load_numpy_checkpoint(checkpoint))


def load_numpy_checkpoint(checkpoint: StoragePath) -> NumpyClassifier:
    """The network of a checkpoint directory as numpy arrays (without torch, for model.safetensors);
    one on object storage is fetched first."""
    if not is_uri(checkpoint.uri):
        return _load_directory(Path(checkpoint.path), checkpoint.uri)
    with tempfile.TemporaryDirectory(prefix="fmnist-checkpoint-") as local:
        # Only what the network needs: not the optimizer's state, twice the model's size.
        for name in (CONFIG_FILE, MODEL_FILE, LEGACY_MODEL_FILE):
            source = checkpoint.child(name)
            if source.exists():  # a missing one is told by _load_directory, as for a local checkpoint
                Path(local, name).write_bytes(source.read_bytes())
        return _load_directory(Path(local), checkpoint.uri)


def _load_directory(directory: Path, shown: str) -> NumpyClassifier:
    """The network in a local checkpoint ``directory``; errors name it as ``shown``."""
    try:
        config = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e  # not the path of a fetched copy
        raise InputError(f"checkpoint {shown} has a missing or bad {CONFIG_FILE} ({why})") from None
    weights_file = _weights_file(directory)
    name = weights_file.name
    try:
        state = _read_weights(weights_file) if name == MODEL_FILE else _read_legacy_weights(weights_file)
    except OSError as e:
        raise InputError(f"checkpoint {shown}: cannot read {name} ({e.strerror or e})") from None
    except Exception:  # safetensors and torch.load raise their own kinds for a damaged file
        raise InputError(f"checkpoint {shown}: {name} is not a saved model (damaged, or not ours)") from None
    try:
        return NumpyClassifier.from_state_dict(state, config)
    except ValueError as e:  # weights that do not fit
        raise InputError(f"checkpoint {shown}: {name} does not fit the model of {CONFIG_FILE} ({e})") from None


def _read_weights(path: Path) -> dict:
    from safetensors.numpy import load

    return load(path.read_bytes())  # (load_file would keep the file open, mapped, for the arrays' lifetime)


def _read_legacy_weights(path: Path) -> dict:
    """An older checkpoint's model.pt (torch.save of a state dict), as numpy arrays; with torch."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def prune_checkpoints(run_dir: StoragePath, keep: int, by_validation: bool) -> None:
    """Keep ``keep`` checkpoints as Ray Train's CheckpointConfig(num_to_keep) does: the best by
    validation accuracy (the later epoch on a tie) and the latest, or without a validation split
    the latest ones. For runs in local mode, whose checkpoints Ray Train does not manage."""
    metrics = checkpoint_metrics(run_dir)
    latest = sorted(metrics, key=lambda n: (metrics[n]["epoch"], n), reverse=True)
    ranked = sorted(metrics, key=lambda n: (metrics[n].get("val_accuracy", 0.0), metrics[n]["epoch"], n),
                    reverse=True) if by_validation else latest
    for name in set(metrics) - set(ranked[:keep]) - set(latest[:1]):
        run_dir.fs.delete_dir(run_dir.child(name).path)
