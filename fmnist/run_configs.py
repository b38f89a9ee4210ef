"""The options of a training run and of a search, and the learning-rate schedule they name,
importable without torch or Ray: the command line builds its options and checks them from these,
so that `--help` and a usage error take a fraction of a second, not the 2-3 s of importing what a
run needs; and a run's driver, which never imports torch, follows the schedule too."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fmnist.errors import InputError
from fmnist.model_config import ModelConfig

DEFAULT_EPOCHS = 20
AUGMENTATIONS = ("flip", "shift", "erase")  # what fmnist.augment does with each
CPU_WORKERS = 2  # workers on a CPU-only cluster, unless told otherwise


@dataclass(frozen=True)
class TrainConfig:
    # the recipe (defaults are the tutorial's)
    epochs: int | None = None  # None: DEFAULT_EPOCHS, or on --resume the run's own
    lr: float = 0.002
    batch_size: int = 200  # global, split across workers
    hidden: tuple[int, ...] = (256, 128, 64)
    activation: str = "relu"
    dropout: float = 0.2
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"  # or "cosine"
    seed: int = 0
    validation: int = 0  # training images held out (class-balanced, from the seed) to choose checkpoints on
    augment: tuple[str, ...] = ()  # of AUGMENTATIONS, applied to each training batch
    early_stopping: int = 0  # stop once validation accuracy has not improved for this many epochs; 0: never
    # where and how it runs
    num_workers: int | None = None  # None: one per GPU; on CPUs 1 on your own machine, CPU_WORKERS on a cluster
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: int | None = None
    storage_path: str = "./runs"
    name: str | None = None
    resume: bool = False
    data_dir: str | None = None
    keep: int = 2
    max_failures: int = 3
    resource_timeout_s: float = 60.0
    verbose: bool = False
    mlflow: str | None = None  # an MLflow tracking URI to log to; "" for MLflow's default

    def __post_init__(self):
        if self.early_stopping and not self.validation:
            raise InputError("--early-stopping needs --validation N: it stops on validation accuracy, never on "
                             "the test set's")

    def model_config(self) -> ModelConfig:
        return ModelConfig(hidden=tuple(self.hidden), dropout=self.dropout, activation=self.activation)


@dataclass(frozen=True)
class SearchConfig:
    trials: int = 20
    max_epochs: int = DEFAULT_EPOCHS  # ASHA's budget: each trial's --epochs
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it
    space: str | None = None  # a space file; None: fmnist/search_space.json
    architecture: tuple[int, ...] | None = None  # fix the network, search the recipe only
    search: str = "random"  # or "optuna"
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    concurrency: int | None = None  # None: as many trials as the cluster holds at once
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    storage_path: str = "./runs"
    name: str | None = None
    seed: int = 0  # the validation split, and every trial's seed
    validation: int = 5000
    resume: bool = False
    confirm: int = 0  # seeds to retrain the best recipe with on the full training set
    data_dir: str | None = None
    max_failures: int = 3  # worker failures each trial recovers from, from its last checkpoint
    resource_timeout_s: float = 60.0
    verbose: bool = False
    mlflow: str | None = None  # an MLflow tracking URI each trial logs its run to; "" for MLflow's default


def parse_augmentations(text: str) -> tuple[str, ...]:
    """``"flip,shift"`` -> ("flip", "shift"); ``"none"`` -> (). ValueError for anything else."""
    names = () if text == "none" else tuple(text.split(","))
    if any(n not in AUGMENTATIONS for n in names) or len(set(names)) != len(names):
        raise ValueError(f"expected 'none' or a comma-separated list of {', '.join(AUGMENTATIONS)}, got {text!r}")
    return tuple(n for n in AUGMENTATIONS if n in names)  # one order, whatever the order given


def augmentations_text(names: tuple[str, ...]) -> str:
    """The --augment text of ``names``: the inverse of parse_augmentations."""
    return ",".join(names) or "none"


def learning_rate(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """Epoch ``epoch``'s (1-based) learning rate: constant, or cosine from ``lr`` towards 0 at the end.

    A function of the epoch alone, so a resumed run, or one extended with --epochs, follows
    the schedule of a run planned for that many epochs.
    """
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    return lr
