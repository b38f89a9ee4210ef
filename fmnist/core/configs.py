"""The options of a training run and of a search, and the learning-rate schedule they name,
importable without torch or Ray: the command line builds its options from these, so that `--help`
and a usage error take a fraction of a second, not the 2-3 s of importing what a run needs; and a
run's driver, which never imports torch, follows the schedule too.

A TrainConfig checks itself, by the rules the command line's options are built from: a search
builds its trials' configs directly, and ``train_arguments`` turns one back into `fmnist train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fmnist.core.errors import InputError
from fmnist.core.model_config import ACTIVATIONS, ModelConfig

DEFAULT_EPOCHS = 20
CPU_WORKERS = 2  # workers on a CPU-only cluster, unless told otherwise
AUGMENTATIONS = ("flip", "shift", "erase")  # what fmnist.train.augment does with each
SCHEDULES = ("constant", "cosine")
MAX_WIDTH = 65_536  # --hidden: wider layers only run out of memory
MAX_VALIDATION = 30_000  # --validation: half the training set at most


@dataclass(frozen=True)
class Rule:
    """What the values of a numeric option must be: of ``kind``, finite, and ``accept``ed; said as ``expected``."""

    kind: type
    accept: Callable[[Any], bool]
    expected: str

    def allows(self, value: Any) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        kind_ok = isinstance(value, int) if self.kind is int else number
        return number and kind_ok and math.isfinite(value) and self.accept(value)


POSITIVE_INT = Rule(int, lambda v: v >= 1, "a positive integer")
NON_NEGATIVE_INT = Rule(int, lambda v: v >= 0, "an integer >= 0")
NON_NEGATIVE = Rule(float, lambda v: v >= 0, "a number >= 0")
PROBABILITY = Rule(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
SEED = Rule(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
# The numeric options of `fmnist train` (None, where a field allows it, is "decide for me").
TRAIN_RULES: dict[str, Rule] = {
    "epochs": POSITIVE_INT, "lr": Rule(float, lambda v: v > 0, "a positive number"), "batch_size": POSITIVE_INT,
    "dropout": PROBABILITY, "weight_decay": NON_NEGATIVE, "label_smoothing": PROBABILITY, "seed": SEED,
    "validation": Rule(int, lambda v: 0 <= v <= MAX_VALIDATION, f"an integer from 0 to {MAX_VALIDATION:,}"),
    "early_stopping": NON_NEGATIVE_INT, "num_workers": POSITIVE_INT, "cpus_per_worker": POSITIVE_INT,
    "keep": POSITIVE_INT, "max_failures": NON_NEGATIVE_INT, "resource_timeout_s": NON_NEGATIVE,
}
OPTION_NAMES = {"resource_timeout_s": "resource-timeout"}  # where an option is not its field's name


def option_name(field: str) -> str:
    """The `fmnist train` option of a TrainConfig field: "batch_size" -> "--batch-size"."""
    return "--" + OPTION_NAMES.get(field, field.replace("_", "-"))


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
        """InputError for a value `fmnist train` would refuse, naming its option."""
        def refuse(field: str, expected: str, value: Any) -> None:
            raise InputError(f"{option_name(field)}: expected {expected}, got {value!r}")

        for field, rule in TRAIN_RULES.items():
            value = getattr(self, field)
            if value is not None and not rule.allows(value):
                refuse(field, rule.expected, value)
        if not self.hidden or not all(isinstance(w, int) and 1 <= w <= MAX_WIDTH for w in self.hidden):
            refuse("hidden", f"widths from 1 to {MAX_WIDTH:,}", self.hidden)
        if self.activation not in ACTIVATIONS:
            refuse("activation", f"one of {', '.join(ACTIVATIONS)}", self.activation)
        if self.schedule not in SCHEDULES:
            refuse("schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        if not set(self.augment) <= set(AUGMENTATIONS) or len(set(self.augment)) != len(self.augment):
            refuse("augment", f"some of {', '.join(AUGMENTATIONS)}", self.augment)
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
    space: str | None = None  # a space file; None: fmnist/tune/search_space.json
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


def train_arguments(config: TrainConfig, fields: Sequence[str]) -> list[str]:
    """The `fmnist train` options that set ``fields`` to ``config``'s values (those it leaves to
    the defaults, None, left out): what a search prints to reproduce a trial."""
    args = []
    for field in fields:
        value = getattr(config, field)
        if field == "use_gpu" and value is not None:
            args.append("--use-gpu" if value else "--no-gpu")
        elif isinstance(value, bool):
            args += [option_name(field)] * value
        elif value is not None:
            text = (augmentations_text(value) if field == "augment"
                    else ",".join(map(str, value)) if isinstance(value, tuple) else str(value))
            args += [option_name(field), text]
    return args


def learning_rate(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """Epoch ``epoch``'s (1-based) learning rate: constant, or cosine from ``lr`` towards 0 at the end.

    A function of the epoch alone, so a resumed run, or one extended with --epochs, follows
    the schedule of a run planned for that many epochs.
    """
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    return lr
