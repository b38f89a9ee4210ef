"""Checkpoint directories: what is in one, and how to find and load the best of a run.

A checkpoint directory holds
  model.pt            the model's state dict
  model_config.json   ModelConfig: enough to rebuild the model without the training options
  metrics.json        the epoch's figures (epoch, train_loss, test_loss, test_accuracy, ...)
  training_state.pt   what resuming needs: optimizer, epoch, seed, history
A run directory holds Ray Train's ``checkpoint_*`` directories; "the run" means its best one by
validation accuracy when it was trained with --validation, and otherwise its last: nothing is
chosen on the test set, which is kept for the figures reported.

model.pt is read without torch (scoring on CPUs never imports it: 1.5 s of a process's start).
It is torch.save's file format: a zip archive of a pickle, whose tensors refer to raw storages
stored beside it; only the few names a state dict of float tensors uses are unpickled.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmnist.errors import InputError
from fmnist.model_config import ModelConfig
from fmnist.numpy_model import NumpyClassifier
from fmnist.storage import StoragePath, is_uri

if TYPE_CHECKING:
    import torch

    from fmnist.model import Classifier

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "training_state.pt"


def save_checkpoint(
    directory: Path, model: torch.nn.Module, config: ModelConfig, metrics: dict, training_state: dict
) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    torch.save(training_state, directory / STATE_FILE)


def load_training_state(directory: Path) -> dict[str, Any]:
    import torch

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
    """The eval-mode torch model (CPU) of a checkpoint directory."""
    from fmnist.model import Classifier

    return Classifier.from_numpy(load_numpy_checkpoint(checkpoint))


def load_numpy_checkpoint(checkpoint: StoragePath) -> NumpyClassifier:
    """The network of a checkpoint directory as numpy arrays, read without torch; one on object
    storage is fetched first."""
    if not is_uri(checkpoint.uri):
        return _load_directory(Path(checkpoint.path), checkpoint.uri)
    with tempfile.TemporaryDirectory(prefix="fmnist-checkpoint-") as local:
        # Only what the network needs: not the optimizer's state, twice the model's size.
        for name in (CONFIG_FILE, MODEL_FILE):
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
    try:
        state = read_state_dict(directory / MODEL_FILE)
    except OSError as e:
        raise InputError(f"checkpoint {shown}: cannot read {MODEL_FILE} ({e.strerror or e})") from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError):
        raise InputError(f"checkpoint {shown}: {MODEL_FILE} is not a saved model (damaged, or not ours)") from None
    try:
        return NumpyClassifier.from_state_dict(state, config)
    except ValueError as e:  # not a state dict, or weights that do not fit
        raise InputError(f"checkpoint {shown}: {MODEL_FILE} does not fit the model of {CONFIG_FILE} ({e})") from None


def read_state_dict(path: Path) -> Any:
    """What torch.save wrote to ``path`` (a state dict: {name: numpy array}), read without torch.

    As torch.load(weights_only=True) does, only plain containers and tensors are unpickled."""
    with zipfile.ZipFile(path) as archive:
        pickled = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickled) != 1:
            raise ValueError("no pickle in the archive")
        root = pickled[0].rsplit("/", 1)[0]  # the archive's folder: the file's name when it was saved
        if archive.read(f"{root}/byteorder").decode() != "little":
            raise ValueError("big-endian tensors")

        class StateDictUnpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) == ("collections", "OrderedDict"):
                    return collections.OrderedDict
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if (module, name) == ("torch", "FloatStorage"):  # our models' tensors are all float32
                    return np.float32
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

            def persistent_load(self, saved_id: tuple) -> np.ndarray:  # ('storage', type, key, device, numel)
                _, dtype, key, _, numel = saved_id
                return np.frombuffer(archive.read(f"{root}/data/{key}"), dtype, count=numel)

        return StateDictUnpickler(io.BytesIO(archive.read(pickled[0]))).load()


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2, for numpy: the tensor's elements of its storage (strides in elements)."""
    if min(size, default=1) == 0:
        return np.empty(size, storage.dtype)
    last = offset + sum((n - 1) * step for n, step in zip(size, stride))
    if offset < 0 or min(stride, default=0) < 0 or last >= len(storage):  # a damaged file: never read past it
        raise ValueError("a tensor outside its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [step * storage.itemsize for step in stride])
    return view.copy()
