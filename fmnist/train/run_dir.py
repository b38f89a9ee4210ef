"""A run's directory: a new one, or the one a resume continues with the recipe it started with."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from fmnist.core.configs import DEFAULT_EPOCHS, TrainConfig
from fmnist.core.errors import InputError
from fmnist.core.run_layout import RUN_CONFIG_FILE, read_history, run_or_search_dir, stopped_early, storage_root
from fmnist.core.storage import StoragePath

# Options that define what is trained; a resumed run keeps the ones it started with.
RECIPE_FIELDS = (
    "epochs", "lr", "batch_size", "hidden", "activation", "dropout", "weight_decay", "label_smoothing", "schedule",
    "seed", "validation", "augment", "early_stopping",
)
# Where it ran; a resumed run keeps these too unless told otherwise, since other workers draw
# other dropout masks (and other threads round differently).
PLACEMENT_FIELDS = ("num_workers", "use_gpu", "cpus_per_worker")
# What runs from before these options used.
NEWER_RECIPE_DEFAULTS = {"activation": "relu", "validation": 0, "augment": [], "early_stopping": 0}


def count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


def pick_run_dir(config: TrainConfig) -> tuple[StoragePath, TrainConfig]:
    """The run directory, and the config to run with (a resumed run's own recipe)."""
    storage = storage_root(config.storage_path)
    name = config.name
    if config.resume and name is None:
        configs = [storage.child(d).child(RUN_CONFIG_FILE) for d in storage.subdirectories()]
        started = {c.path: c.fs.get_file_info(c.path).mtime for c in configs if c.exists()}  # written on each (re)start
        if not started:
            raise InputError(f"--resume: no run to resume in {storage.uri}; pass --storage-path/--name")
        name = max(started, key=started.get).split("/")[-2]
    run_dir = run_or_search_dir(storage, name, config.resume, "run", RUN_CONFIG_FILE)
    name = run_dir.name
    if not config.resume:
        return run_dir, replace(config, name=name, epochs=config.epochs or DEFAULT_EPOCHS)
    try:
        saved = json.loads(run_dir.read_text(RUN_CONFIG_FILE))
        saved = {**NEWER_RECIPE_DEFAULTS, **saved}
        recipe = {k: saved[k] for k in RECIPE_FIELDS if k != "epochs"}
        recipe["hidden"], recipe["augment"] = tuple(recipe["hidden"]), tuple(recipe["augment"])
        # --epochs on a resume may extend the run; otherwise it ends where it was meant to.
        epochs = config.epochs or int(saved["epochs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--resume: {run_dir.uri}/{RUN_CONFIG_FILE} is damaged ({type(e).__name__}: {e}); "
                         "start a new run instead") from None
    _warn_ignored_recipe(config, recipe)
    placement = {k: saved[k] for k in PLACEMENT_FIELDS if getattr(config, k) is None and saved.get(k) is not None}
    _note_changed_placement(config, saved)
    history = read_history(run_dir)
    done = len(history)
    if stopped_early(history):
        raise InputError(f"--resume: {run_dir.uri} stopped early at epoch {done} (no better validation accuracy "
                         f"for {count(saved['early_stopping'], 'epoch')}); its best checkpoint is the run's. Start "
                         "a new run to train on")
    if done >= epochs:
        raise InputError(f"--resume: {run_dir.uri} has finished {done} epochs; pass --epochs N (more than {done}) "
                         "to train it further")
    return run_dir, replace(config, name=name, epochs=epochs, **recipe, **placement)


def _warn_ignored_recipe(config: TrainConfig, recipe: dict) -> None:
    """A resumed run keeps its recipe: say so for options given that would change it."""
    defaults = TrainConfig()
    ignored = [k for k, v in recipe.items() if getattr(config, k) not in (v, getattr(defaults, k))]
    if ignored:
        options = ", ".join("--" + k.replace("_", "-") for k in ignored)
        print(f"note: a resumed run keeps its recipe; ignoring {options}", file=sys.stderr)


def _note_changed_placement(config: TrainConfig, saved: dict) -> None:
    """A resumed run given other workers, GPU use or threads than it started with: say what that costs."""
    changed = [k for k in PLACEMENT_FIELDS if getattr(config, k) is not None and getattr(config, k) != saved.get(k)]
    if changed:
        given = ", ".join(f"{k} {saved.get(k)} -> {getattr(config, k)}" for k in changed)
        print(f"note: resuming on another placement than the run started with ({given}); its figures will "
              "differ from an uninterrupted run's", file=sys.stderr)
