"""Search spaces for ``fmnist tune``: read and check a space file, and turn a trial's sample into a recipe.

A space file is JSON: one entry per recipe option of ``fmnist train``, each a fixed value or one of

    {"choice": [a, b, ...]}     one of the values
    {"uniform": [low, high]}    a number between low and high
    {"loguniform": [low, high]} the same on a log scale (learning rates)
    {"int": [low, high]}        a whole number from low to high, both included

``augment`` takes the values of ``fmnist train --augment`` ("none", "flip,shift", ...).
The network is ``depth`` hidden layers, the first ``width`` wide, each next one ``shrink`` times the
one before (the tutorial's 256,128,64 is depth 3, width 256, shrink 0.5); ``--architecture`` fixes it
instead. Only the file's form is checked here, before Ray starts; the values of each trial's recipe
are checked as ``fmnist train`` checks its options, when the trial starts, so that an impossible
recipe fails its trial alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import tune

from fmnist.core.configs import parse_augmentations
from fmnist.core.errors import InputError

DEFAULT_SPACE = Path(__file__).with_name("search_space.json")
ARCHITECTURE_KEYS = ("depth", "width", "shrink")
# Each option a space may name, and the type of its values.
PARAMETERS: dict[str, type] = {
    "depth": int, "width": int, "shrink": float, "activation": str, "lr": float, "batch_size": int,
    "dropout": float, "weight_decay": float, "label_smoothing": float, "schedule": str, "augment": str,
    "early_stopping": int,
}
# Which distributions each type of value may have.
DISTRIBUTIONS = {int: ("choice", "int"), float: ("choice", "uniform", "loguniform"), str: ("choice",)}
MIN_WIDTH = 10  # no hidden layer narrower than the 10 outputs


def load_space(path: str | None, architecture: tuple[int, ...] | None) -> dict[str, Any]:
    """The checked space of ``path`` (None: the default), without the network's keys when
    ``architecture`` fixes it; InputError for a file that is missing, malformed, or fixes everything."""
    file = Path(path) if path else DEFAULT_SPACE
    try:
        space = json.loads(file.read_text())
    except OSError as e:
        raise InputError(f"--space {file}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise InputError(f"--space {file} is not JSON ({e})") from None
    if not isinstance(space, dict):
        raise InputError(f"--space {file} must hold a JSON object of options, like {DEFAULT_SPACE.name}")
    for key, value in space.items():
        _check_entry(file, key, value)
    if architecture is not None:
        space = {k: v for k, v in space.items() if k not in ARCHITECTURE_KEYS}
    if not any(_varies(v) for v in space.values()):
        fixed = " (with the network fixed by --architecture)" if architecture is not None else ""
        raise InputError(f"--space {file} has nothing to search{fixed}: give some option a choice or a range")
    return space


def _check_entry(file: Path, key: str, value: Any) -> None:
    if key not in PARAMETERS:
        raise InputError(f"--space {file}: unknown option {key!r}; the options are {', '.join(PARAMETERS)}")
    kind = PARAMETERS[key]
    where = f"--space {file}: {key}"
    if not isinstance(value, dict):
        if not _is(value, kind):
            raise InputError(f"{where} must be a {kind.__name__} or a distribution, got {value!r}")
        _check_value(where, key, value)
        return
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS[kind]:
        forms = " or ".join(f'{{"{d}": ...}}' for d in DISTRIBUTIONS[kind])
        raise InputError(f"{where} must be a {kind.__name__} or one of {forms}, got {json.dumps(value)}")
    (distribution, arguments), = value.items()
    if distribution == "choice":
        if not isinstance(arguments, list) or not arguments or not all(_is(a, kind) for a in arguments):
            raise InputError(f"{where}: choice needs a non-empty list of {kind.__name__} values, "
                             f"got {json.dumps(arguments)}")
        for argument in arguments:
            _check_value(where, key, argument)
        return
    if (not isinstance(arguments, list) or len(arguments) != 2 or not all(_is(a, kind) for a in arguments)
            or arguments[0] > arguments[1] or (distribution == "loguniform" and arguments[0] <= 0)):
        positive = " above 0" if distribution == "loguniform" else ""
        raise InputError(f"{where}: {distribution} needs [low, high], {kind.__name__}s{positive} with low <= high, "
                         f"got {json.dumps(arguments)}")


def _check_value(where: str, key: str, value: Any) -> None:
    """Values whose form alone can be wrong: an augmentation list. (Numbers out of range fail their trial.)"""
    if key == "augment":
        try:
            parse_augmentations(value)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _varies(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    (distribution, arguments), = value.items()
    return len(set(arguments)) > 1 if distribution == "choice" else arguments[0] < arguments[1]


def tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """The checked space as Ray Tune's param_space."""
    def domain(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        (distribution, arguments), = value.items()
        if distribution == "choice":
            return tune.choice(arguments)
        if distribution == "int":
            return tune.randint(arguments[0], arguments[1] + 1)  # Tune's upper bound is excluded
        return getattr(tune, distribution)(*arguments)

    return {key: domain(value) for key, value in space.items()}


def recipe(sample: dict[str, Any], architecture: tuple[int, ...] | None) -> dict[str, Any]:
    """A trial's ``fmnist train`` recipe from Tune's sample: the network as ``hidden`` widths, and
    numbers rounded to 3 significant digits, so that the command reproducing it is short."""
    out: dict[str, Any] = {}
    if architecture is not None:
        out["hidden"] = tuple(architecture)
    elif any(k in sample for k in ARCHITECTURE_KEYS):
        depth, width, shrink = (sample.get("depth", 3), sample.get("width", 256), sample.get("shrink", 0.5))
        out["hidden"] = tuple(max(MIN_WIDTH, round(width * shrink ** i)) for i in range(depth))
    for key, value in sample.items():
        if key == "augment":
            out[key] = parse_augmentations(value)
        elif key not in ARCHITECTURE_KEYS:
            out[key] = float(f"{value:.3g}") if isinstance(value, float) else value
    return out
